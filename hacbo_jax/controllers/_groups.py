"""Shared machinery of the HACBO and BLAC transformations.

Label parsing (a static leaf -> (block, sub-module) layout, per-layer ``"3/mlp"`` or stacked
``"*/mlp"``), the per-block sign-cosine and per-group gradient norms of a measurement, per-tensor
fake int8, the per-group scaling of an update, the global update-norm budget, hyper-parameter
checks and the measurement cadence. Reference: ``docs/algorithm.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
Labels = PyTree | Callable[[PyTree], PyTree]

_CONTROLLED_LABEL = re.compile(r"^(\d+)/(.+)$")
_STACKED_LABEL = re.compile(r"^\*/(.+)$")
UNCONTROLLED = -1
# leaf_block of a stacked leaf ("*/mlp"): its leading axis is the block axis.
STACKED = -2


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """Static map from the leaves of a label tree to controller groups.

    Attributes:
      treedef: structure of the label tree; the parameter/update trees are flattened *up to* it,
        so a leaf position may hold an array or an empty subtree (``optax.MaskedNode``).
      leaf_block: per label leaf, its block index, ``UNCONTROLLED``, or ``STACKED`` for a leaf
        labelled ``"*/<submodule>"`` whose slice i along axis 0 belongs to block i (only from
        ``resolve_layout(..., allow_stacked=True)``).
      leaf_submodule: per label leaf, its sub-module index, or ``UNCONTROLLED``.
      num_blocks: B.
      submodules: sub-module names in their fixed order (length M).
    """

    treedef: Any
    leaf_block: tuple[int, ...]
    leaf_submodule: tuple[int, ...]
    num_blocks: int
    submodules: tuple[str, ...]

    @property
    def num_submodules(self) -> int:
        return len(self.submodules)

    @property
    def has_stacked(self) -> bool:
        return STACKED in self.leaf_block


def parse_labels(
    label_tree: PyTree,
    submodules: Sequence[str] | None = None,
    *,
    stacked_blocks: int | None = None,
) -> GroupLayout:
    """Builds the static layout of a tree whose leaves are label strings.

    A leaf ``"{block}/{submodule}"`` (e.g. ``"3/mlp"``) is controlled; so is a stacked leaf
    ``"*/{submodule}"`` when ``stacked_blocks`` (B, the leading size of the stacked leaves) is
    given; any other string is not. Blocks must be numbered 0..B-1 (numbered labels next to
    stacked ones must lie in 0..stacked_blocks-1). Sub-modules are ordered by ``submodules`` if
    given, else sorted.

    Raises:
      ValueError: for a non-string leaf, no controlled leaf, non-contiguous block numbers, a
        sub-module missing from ``submodules``, or a stacked label without ``stacked_blocks``.
    """
    leaves, treedef = jax.tree.flatten(label_tree)
    parsed: list[tuple[int, str] | None] = []
    for leaf in leaves:
        if not isinstance(leaf, str):
            raise ValueError(
                f"label leaves must be strings like '3/mlp', '*/mlp' or 'other', got {leaf!r} "
                f"of type {type(leaf).__name__}"
            )
        match = _CONTROLLED_LABEL.match(leaf)
        stacked = _STACKED_LABEL.match(leaf)
        if match is not None:
            parsed.append((int(match.group(1)), match.group(2)))
        elif stacked is not None:
            if stacked_blocks is None:
                raise ValueError(
                    f"label {leaf!r} is a stacked-layer label; its number of blocks comes from "
                    "the leading axis of the leaves, so build the layout with "
                    "resolve_layout(labels, tree, submodules, allow_stacked=True)"
                )
            parsed.append((STACKED, stacked.group(1)))
        else:
            parsed.append(None)
    controlled = [p for p in parsed if p is not None]
    if not controlled:
        raise ValueError("no leaf is labelled '{block}/{submodule}'; nothing to control")
    blocks = sorted({b for b, _ in controlled if b != STACKED})
    if stacked_blocks is not None and any(b == STACKED for b, _ in controlled):
        num_blocks = int(stacked_blocks)
        outside = [b for b in blocks if b >= num_blocks]
        if outside:
            raise ValueError(
                f"numbered labels use blocks {outside}, but the stacked leaves' leading axis "
                f"gives B = {num_blocks} blocks (0..{num_blocks - 1})"
            )
    else:
        if blocks != list(range(len(blocks))):
            raise ValueError(
                f"blocks must be numbered 0..B-1 without gaps, got block numbers {blocks}"
            )
        num_blocks = len(blocks)
    found = sorted({m for _, m in controlled})
    if submodules is None:
        names = tuple(found)
    else:
        names = tuple(submodules)
        if len(set(names)) != len(names):
            raise ValueError(f"submodules has duplicates: {names}")
        unknown = [m for m in found if m not in names]
        if unknown:
            raise ValueError(f"labels use sub-modules {unknown} that are not in submodules={names}")
    index = {m: i for i, m in enumerate(names)}
    leaf_block = tuple(UNCONTROLLED if p is None else p[0] for p in parsed)
    leaf_sub = tuple(UNCONTROLLED if p is None else index[p[1]] for p in parsed)
    return GroupLayout(treedef, leaf_block, leaf_sub, num_blocks, names)


def resolve_layout(
    labels: Labels,
    tree: PyTree,
    submodules: Sequence[str] | None,
    *,
    allow_stacked: bool = False,
) -> GroupLayout:
    """Parses ``labels`` (a label tree, or a callable of ``tree`` returning one).

    With ``allow_stacked``, leaves labelled ``"*/{submodule}"`` are stacked: every such leaf of
    ``tree`` must have the same leading size B, which fixes the number of blocks (see
    ``notes/label_form.md``). Without it, a stacked label is an error (so that code that does
    not handle ``STACKED`` never sees one).
    """
    label_tree = labels(tree) if callable(labels) else labels
    if not allow_stacked:
        return parse_labels(label_tree, submodules)
    label_leaves = jax.tree.leaves(label_tree)
    if not any(isinstance(x, str) and _STACKED_LABEL.match(x) for x in label_leaves):
        return parse_labels(label_tree, submodules)
    treedef = jax.tree.structure(label_tree)
    try:
        leaves = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        raise ValueError(f"the tree does not have the structure of the label tree: {err}") from err
    leading = set()
    for label, leaf in zip(label_leaves, leaves):
        if isinstance(label, str) and _STACKED_LABEL.match(label) and _is_array(leaf):
            if jnp.ndim(leaf) < 1:
                raise ValueError(
                    f"stacked label {label!r} is on a scalar leaf; it needs a leading block axis"
                )
            leading.add(int(jnp.shape(leaf)[0]))
    if len(leading) != 1:
        raise ValueError(
            "all leaves labelled '*/{submodule}' must have the same leading (block) size, got "
            f"leading sizes {sorted(leading)}"
        )
    return parse_labels(label_tree, submodules, stacked_blocks=leading.pop())


def is_params_placeholder(params: PyTree) -> bool:
    """True for the stand-in that ``optax.tree_utils.tree_map_params`` passes to ``init`` to
    find the parameter-shaped subtrees of a state (``optax.masked`` tests for it the same way).

    It has no leaves, so labels cannot be read off it (a callable label tree, or a stacked one
    whose B is a leading size): ``init`` then returns a state of the right structure whose
    per-block arrays have size 0; ``tree_map_params`` reads only the structure of that state
    and maps the real state's values.
    """
    placeholder = getattr(optax.tree_utils._state_utils, "_ParamsPlaceholder", None)
    return placeholder is not None and isinstance(params, placeholder)


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "dtype")


def flatten_like(layout: GroupLayout, tree: PyTree, name: str) -> list[Any]:
    """Flattens ``tree`` up to the label structure (empty subtrees such as MaskedNode survive)."""
    try:
        return layout.treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{name} does not have the structure of the label tree: {err}") from err


def check_groups_present(layout: GroupLayout, leaves: Sequence[Any]) -> np.ndarray:
    """Returns the static number of coordinates of each (block, sub-module) group, f64[B, M].

    A stacked leaf of shape [B, ...] gives size / B coordinates to every block.

    Raises:
      ValueError: if a group has no array leaf (its curvature would stay 0 and take all the
        curvature weight of its block).
    """
    sizes = np.zeros((layout.num_blocks, layout.num_submodules))
    present = np.zeros((layout.num_blocks, layout.num_submodules), bool)
    for leaf, b, m in zip(leaves, layout.leaf_block, layout.leaf_submodule):
        if b == UNCONTROLLED or not _is_array(leaf):
            continue
        if b == STACKED:
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != layout.num_blocks:
                raise ValueError(
                    f"a stacked leaf of shape {jnp.shape(leaf)} needs the leading (block) size "
                    f"B = {layout.num_blocks}"
                )
            sizes[:, m] += np.size(leaf) / layout.num_blocks
            present[:, m] = True
        else:
            sizes[b, m] += np.size(leaf)
            present[b, m] = True
    missing = [(b, layout.submodules[m]) for b, m in zip(*np.nonzero(~present))]
    if missing:
        raise ValueError(
            f"every block needs every sub-module {layout.submodules}; (block, sub-module) groups "
            f"without any parameter: {missing[:8]}. Label those parameters 'other' or pass "
            "submodules= listing only the sub-modules all blocks have."
        )
    return sizes


# The 2-bit sign sketch (compose.dev_sign_sketch): a code per coordinate, four to a byte, the
# first coordinate in the low bits. Code 3 (both bits set) marks NaN or +-inf.
SKETCH_ZERO, SKETCH_POSITIVE, SKETCH_NEGATIVE, SKETCH_NONFINITE = 0, 1, 2, 3
_CODES_PER_BYTE = 4
_CODE_SHIFTS = (0, 2, 4, 6)


def _packed_bytes(count: int) -> int:
    """Bytes holding ``count`` codes: ceil(count / 4)."""
    return -(-count // _CODES_PER_BYTE)


def sketch_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The sketch's uint8 shape for a leaf of ``shape``: the leading (block) axis kept, the rest
    flattened and packed four coordinates a byte (a scalar is one row of one coordinate)."""
    rows = shape[0] if len(shape) else 1
    return rows, _packed_bytes(math.prod(shape[1:]))


def pack_sign_codes(x: jax.Array) -> jax.Array:
    """``x``'s sign codes (0, +1 -> 1, -1 -> 2, NaN/+-inf -> 3) packed as :func:`sketch_shape`."""
    x32 = jnp.asarray(x).astype(jnp.float32)
    rows, packed = sketch_shape(x32.shape)
    x2 = x32.reshape(rows, math.prod(x32.shape[1:]))
    code = jnp.where(
        jnp.abs(x2) < jnp.inf,
        jnp.where(x2 > 0, SKETCH_POSITIVE, jnp.where(x2 < 0, SKETCH_NEGATIVE, SKETCH_ZERO)),
        SKETCH_NONFINITE,
    ).astype(jnp.uint8)
    code = jnp.pad(code, ((0, 0), (0, packed * _CODES_PER_BYTE - x2.shape[1])))
    shifted = code.reshape(rows, packed, _CODES_PER_BYTE) << jnp.asarray(_CODE_SHIFTS, jnp.uint8)
    return jnp.sum(shifted, axis=-1, dtype=jnp.uint8)  # the bits do not overlap: sum = or


def _unpack_signs(packed: jax.Array, count: int) -> jax.Array:
    """f32 signs (-1, 0, +1; a non-finite code gives 0) of the first ``count`` coordinates of
    each packed row, flattened: ``packed`` holds whole rows of ``ceil(count / 4)`` bytes."""
    rows = packed.reshape(-1, _packed_bytes(count))  # a chunk may hold several rows
    code = (rows[..., None] >> jnp.asarray(_CODE_SHIFTS, jnp.uint8)) & 3
    code = code.reshape(rows.shape[0], -1)[:, :count].reshape(-1)
    return (code == SKETCH_POSITIVE).astype(jnp.float32) - (code == SKETCH_NEGATIVE).astype(
        jnp.float32
    )


# An unstacked leaf at least this large is reduced in chunks (see _row_sums).
_CHUNKED_MIN_SIZE = 2**16
_MAX_CHUNKS = 32


def _row_sums(fn: Callable[..., tuple], xs: Sequence[jax.Array], stacked: bool) -> tuple:
    """``fn(*rows)`` (a tuple of f32 scalars) per slice along the block axis (stacked: f32[B]
    each), or summed over chunks of the leading axis (unstacked: scalars).

    Why rows: XLA's CPU backend keeps an elementwise value that feeds several reductions (the
    sign of a gradient feeds its dot product and its non-zero count) as a full-size buffer. One
    slice at a time (``lax.map``), such buffers are one slice big instead of one leaf big: on
    Qwen3-0.6B this took the HACBO measurement step's XLA temporaries from 6.49 to 4.10 GiB.
    """
    if stacked:
        return jax.lax.map(lambda rows: fn(*rows), tuple(xs))
    x0 = xs[0]
    chunks = math.gcd(x0.shape[0], _MAX_CHUNKS) if x0.ndim and x0.size >= _CHUNKED_MIN_SIZE else 1
    if chunks == 1:
        return fn(*xs)
    per_chunk = jax.lax.map(lambda rows: fn(*rows), tuple(x.reshape(chunks, -1) for x in xs))
    return tuple(jnp.sum(v) for v in per_chunk)


def _sign_statistics(gt: jax.Array, gd: jax.Array, row_length: int | None = None) -> tuple:
    """(sum sign(gt) sign(gd), nnz(gt), nnz(gd), sum gt^2) of one slice, in float32. With
    ``row_length``, ``gd`` is the slice's packed sign sketch (rows of ``row_length`` codes)."""
    gt32 = gt.astype(jnp.float32)
    st = jnp.sign(gt32)
    if row_length is None:
        sd = jnp.sign(gd.astype(jnp.float32))
    else:
        st, gt32 = st.reshape(-1), gt32.reshape(-1)
        sd = _unpack_signs(gd, row_length)
    return tuple(jnp.sum(v) for v in (st * sd, st * st, sd * sd, gt32 * gt32))


def sign_cosine_and_sq_norms(
    layout: GroupLayout, train_leaves: Sequence[Any], dev_leaves: Sequence[Any]
) -> tuple[jax.Array, jax.Array]:
    """Per-block sign-cosine f32[B] and per-group squared L2 norm of g_train f32[B, M].

    cos_b = sum_i sign(gt_i) sign(gd_i) / (sqrt(nnz(gt)) sqrt(nnz(gd))) over all coordinates of
    block b (the L2 norm of a sign vector is the square root of its number of non-zeros), and
    cos_b = 0 when either count is 0; clipped to [-1, 1] (float32 rounding gives 1.0000001 for
    two agreeing coordinates). Sign products and counts are summed in float32: exact while a slice
    has fewer than 2^24 coordinates (beyond, relative error ~1e-7), and about 1.5x faster on CPU
    than int32 sums. Stacked leaves are reduced per slice along their block axis, large unstacked
    ones in up to 32 chunks of their leading axis (:func:`_row_sums`: no leaf-sized temporaries).
    """
    num_b, num_m = layout.num_blocks, layout.num_submodules
    dots, nnz_t, nnz_d, sq, blocks, groups = [], [], [], [], [], []
    dot_b = nt_b = nd_b = jnp.zeros(num_b, jnp.float32)
    sq_bm = jnp.zeros((num_b, num_m), jnp.float32)
    for gt, gd, b, m in zip(train_leaves, dev_leaves, layout.leaf_block, layout.leaf_submodule):
        if b == UNCONTROLLED or not _is_array(gt):
            continue
        sketched = _is_array(gd) and jnp.result_type(gd) == jnp.uint8
        want = sketch_shape(jnp.shape(gt)) if sketched else jnp.shape(gt)
        if not _is_array(gd) or jnp.shape(gd) != want:
            raise ValueError(
                f"dev gradient leaf {gd!r} does not match train gradient shape {jnp.shape(gt)}"
                + (f" (its sign sketch: uint8{list(want)})" if sketched else "")
            )
        stacked = b == STACKED
        row_length = math.prod(jnp.shape(gt)[1:]) if sketched else None
        stats = functools.partial(_sign_statistics, row_length=row_length)
        sums = _row_sums(stats, (gt, gd), stacked)
        if stacked:
            dot_b, nt_b, nd_b = dot_b + sums[0], nt_b + sums[1], nd_b + sums[2]
            sq_bm = sq_bm.at[:, m].add(sums[3])
            continue
        dots.append(sums[0])
        nnz_t.append(sums[1])
        nnz_d.append(sums[2])
        sq.append(sums[3])
        blocks.append(b)
        groups.append(b * num_m + m)
    if blocks:
        block_ids = np.asarray(blocks)
        dot_b = dot_b.at[block_ids].add(jnp.stack(dots))
        nt_b = nt_b.at[block_ids].add(jnp.stack(nnz_t))
        nd_b = nd_b.at[block_ids].add(jnp.stack(nnz_d))
        sq_flat = jnp.zeros(num_b * num_m, jnp.float32).at[np.asarray(groups)].add(jnp.stack(sq))
        sq_bm = sq_bm + sq_flat.reshape(num_b, num_m)
    denom = jnp.sqrt(nt_b) * jnp.sqrt(nd_b)
    cos = jnp.where(denom > 0, dot_b / jnp.where(denom > 0, denom, 1.0), 0.0)
    return jnp.clip(cos, -1.0, 1.0), sq_bm


def _dot_statistics(gt: jax.Array, gd: jax.Array) -> tuple:
    """(sum gt gd, sum gt^2, sum gd^2) of one slice, in float32."""
    gt32, gd32 = gt.astype(jnp.float32), gd.astype(jnp.float32)
    return tuple(jnp.sum(v) for v in (gt32 * gd32, gt32 * gt32, gd32 * gd32))


def true_cosine(
    layout: GroupLayout, train_leaves: Sequence[Any], dev_leaves: Sequence[Any]
) -> jax.Array:
    """Per-block cosine of the gradients themselves, f32[B]:
    <g_train(b), g_dev(b)> / (||g_train(b)|| ||g_dev(b)||) over every coordinate of block b
    (0 where a norm is 0, clipped to [-1, 1]), reduced like :func:`sign_cosine_and_sq_norms`.

    The reference measures agreement with the cosine of sign vectors; for gradients whose
    coordinates are jointly Gaussian with correlation r the expected sign cosine is
    (2 / pi) arcsin(r), not r. Recording both shows what a threshold on the sign cosine means
    in true cosine. Needs the dev gradient itself, not a sign sketch (ValueError).
    """
    num_b = layout.num_blocks
    dot_b = tt_b = dd_b = jnp.zeros(num_b, jnp.float32)
    dots, tts, dds, blocks = [], [], [], []
    for gt, gd, b in zip(train_leaves, dev_leaves, layout.leaf_block):
        if b == UNCONTROLLED or not _is_array(gt):
            continue
        if not _is_array(gd) or jnp.result_type(gd) == jnp.uint8 or jnp.shape(gd) != jnp.shape(gt):
            raise ValueError(
                "the true cosine needs the dev gradient itself (dev_grad_fn, or dev_grads as "
                f"arrays shaped like the params), got {gd!r} for a leaf of shape {jnp.shape(gt)}"
            )
        sums = _row_sums(_dot_statistics, (gt, gd), b == STACKED)
        if b == STACKED:
            dot_b, tt_b, dd_b = dot_b + sums[0], tt_b + sums[1], dd_b + sums[2]
            continue
        dots.append(sums[0])
        tts.append(sums[1])
        dds.append(sums[2])
        blocks.append(b)
    if blocks:
        ids = np.asarray(blocks)
        dot_b = dot_b.at[ids].add(jnp.stack(dots))
        tt_b = tt_b.at[ids].add(jnp.stack(tts))
        dd_b = dd_b.at[ids].add(jnp.stack(dds))
    denom = jnp.sqrt(tt_b) * jnp.sqrt(dd_b)
    cos = jnp.where(denom > 0, dot_b / jnp.where(denom > 0, denom, 1.0), 0.0)
    return jnp.clip(cos, -1.0, 1.0)


def all_finite(layout: GroupLayout, leaves: Sequence[Any]) -> jax.Array:
    """bool scalar: every controlled array leaf is finite."""
    checks = [
        leaf_is_finite(x)
        for x, b in zip(leaves, layout.leaf_block)
        if b != UNCONTROLLED and _is_array(x)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def leaf_is_finite(x: jax.Array) -> jax.Array:
    """bool scalar: no NaN or +-inf in ``x``. A uint8 leaf is a sign sketch
    (:func:`~hacbo_jax.controllers.compose.dev_sign_sketch`): finite unless a code has both
    bits set (:data:`SKETCH_NONFINITE`); other integer arrays always are.

    ``sum(x * 0) == 0`` rather than ``all(isfinite(x))``: XLA's CPU backend does not fuse the
    pred array of ``isfinite`` into the reduction and keeps it as a leaf-sized buffer, while the
    sum fuses. ``x * 0`` is 0 for a finite ``x`` and NaN for NaN or +-inf, and a sum keeps a NaN.
    (Not ``max|x| < inf``: XLA's CPU max-reduction drops NaN from arrays of 2^16 elements and
    more, as ``tests/test_controller_memory.py`` shows.)
    """
    dtype = jnp.result_type(x)
    if jnp.size(x) == 0:
        return jnp.asarray(True)
    if dtype == jnp.uint8:
        return jnp.max(x & (x >> 1) & 0b01010101) == 0
    if not jnp.issubdtype(dtype, jnp.inexact):
        return jnp.asarray(True)
    return jnp.sum(jnp.asarray(x).astype(jnp.float32) * 0.0) == 0.0


def fake_int8(x: jax.Array, per_slice: bool = False) -> jax.Array:
    """Symmetric per-tensor int8 quantise-dequantise: s = max|x| / 127, x -> round(x / s) * s.

    ``x`` is returned unchanged when max|x| = 0. Rounding is half-to-even (``jnp.round``). With
    ``per_slice``, each slice along axis 0 (a stacked block) is its own tensor.
    """
    axes = tuple(range(1, x.ndim)) if per_slice else None
    scale = jnp.max(jnp.abs(x), axis=axes, keepdims=per_slice) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    return jnp.where(scale > 0, jnp.round(x / safe) * safe, x)


def _block_axis(vector: jax.Array, ndim: int) -> jax.Array:
    return vector.reshape(vector.shape + (1,) * (ndim - 1))


def scale_updates(
    layout: GroupLayout,
    update_leaves: Sequence[Any],
    multipliers: jax.Array,
    probation: jax.Array | None = None,
    gamma: float = 0.0,
) -> list[Any]:
    """Multiplies every controlled leaf of group (b, m) by ``multipliers[b, m]``.

    Leaves of a block in ``probation`` become gamma * fake_int8(multiplier * u) instead. The
    multiply happens outside any control flow (XLA fuses it with the base optimiser and
    ``apply_updates``); the quantisation is one ``lax.cond`` per block whose other branch is the
    identity, which XLA forwards without a copy, so ordinary steps pay for the multiply only
    (stacked leaves: one ``lax.cond`` on "any block in probation", then a per-slice select).
    Uncontrolled leaves are returned as they are; every leaf keeps its dtype (for bf16 leaves the
    quantiser sees multiplier * u rounded to bf16).
    """
    out = list(update_leaves)
    by_block: dict[int, list[int]] = {}
    stacked: list[int] = []
    for i, (u, b) in enumerate(zip(update_leaves, layout.leaf_block)):
        if b == UNCONTROLLED or not _is_array(u):
            continue
        m = layout.leaf_submodule[i]
        factor = _block_axis(multipliers[:, m], u.ndim) if b == STACKED else multipliers[b, m]
        out[i] = (factor * u.astype(jnp.float32)).astype(u.dtype)
        if b == STACKED:
            stacked.append(i)
        else:
            by_block.setdefault(b, []).append(i)
    if probation is None:
        return out

    def quantised(leaves):
        return [(gamma * fake_int8(x.astype(jnp.float32))).astype(x.dtype) for x in leaves]

    for b, idx in by_block.items():
        new = jax.lax.cond(probation[b], quantised, lambda leaves: leaves, [out[i] for i in idx])
        for i, x in zip(idx, new):
            out[i] = x

    def quantised_slices(leaves):
        return [
            jnp.where(
                _block_axis(probation, x.ndim),
                (gamma * fake_int8(x.astype(jnp.float32), per_slice=True)).astype(x.dtype),
                x,
            )
            for x in leaves
        ]

    if stacked:
        new = jax.lax.cond(
            jnp.any(probation), quantised_slices, lambda leaves: leaves, [out[i] for i in stacked]
        )
        for i, x in zip(stacked, new):
            out[i] = x
    return out


def clip_to_budget_with_scale(
    leaves: Sequence[Any], budget: float | None
) -> tuple[list[Any], jax.Array]:
    """Scales the whole update to global L2 norm ``budget`` when its norm exceeds it.

    Returns the leaves and the factor applied (f32 scalar, 1 when under budget or off): the same
    operation as ``optax.clip_by_global_norm(budget)``, computed in float32.
    """
    if budget is None:
        return list(leaves), jnp.ones([], jnp.float32)
    arrays = [u for u in leaves if _is_array(u)]
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(u.astype(jnp.float32))) for u in arrays))
    factor = jnp.where(norm > budget, budget / jnp.where(norm > 0, norm, 1.0), 1.0)
    factor = factor.astype(jnp.float32)
    clipped = [
        (factor * u.astype(jnp.float32)).astype(u.dtype) if _is_array(u) else u for u in leaves
    ]
    return clipped, factor


def clip_to_budget(leaves: Sequence[Any], budget: float | None) -> list[Any]:
    """Scales the whole update to global L2 norm ``budget`` when its norm exceeds it."""
    return clip_to_budget_with_scale(leaves, budget)[0]


# ---------------------------------------------------------------- hyper-parameter checks

_STATIC_HINT = (
    "; under optax.inject_hyperparams list it in static_args (it fixes shapes or control flow)"
)


def _is_concrete_number(value: Any) -> bool:
    """A Python or NumPy real number (not a bool): checked at construction. jax arrays (e.g.
    ``optax.inject_hyperparams``'s injected values, possibly traced) are not checked."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def validate_real(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    allowed: str,
) -> None:
    """Rejects a non-number, a non-finite number or one outside the interval (``allowed`` says
    what is allowed, in the message). jax arrays pass unchecked (injected hyper-parameters)."""
    if isinstance(value, jax.Array) and jnp.ndim(value) == 0:
        return
    if not _is_concrete_number(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r} of type {type(value).__name__}")
    v = float(value)
    below = v <= low if low_open else v < low
    above = v >= high if high_open else v > high
    if not math.isfinite(v) or below or above:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def validate_flag(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"{name} must be True or False, got {value!r} of type {type(value).__name__}"
        )


def validate_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if not (isinstance(value, str) and value in choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def validate_budget(budget: float | None) -> None:
    if budget is not None:
        validate_real(
            "update_norm_budget",
            budget,
            low=0.0,
            low_open=True,
            allowed="None or a finite number > 0",
        )


def validate_positive_int(name: str, value: int, minimum: int = 1) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok or value < minimum:
        hint = _STATIC_HINT if isinstance(value, jax.Array) else ""
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}{hint}")


def validate_rho(rho: float) -> None:
    validate_real("rho", rho, low=0.0, high=1.0, high_open=True, allowed="a number in [0, 1)")


# ---------------------------------------------------------------- measurement cadence


def dev_gradient_source(
    dev_grads: PyTree | None, dev_grad_fn: Callable | None, params: PyTree | None
) -> Callable[[], PyTree] | None:
    """Returns a thunk producing the micro-dev gradient, or None when neither source is given
    (then the traced update contains no measurement)."""
    if dev_grads is not None and dev_grad_fn is not None:
        raise ValueError("pass either dev_grads or dev_grad_fn, not both")
    if dev_grads is not None:
        return lambda: dev_grads
    if dev_grad_fn is None:
        return None
    if not callable(dev_grad_fn):
        raise ValueError(f"dev_grad_fn must be callable, got {type(dev_grad_fn).__name__}")
    if params is None:
        raise ValueError("dev_grad_fn needs the params: call update(updates, state, params, ...)")
    return lambda: dev_grad_fn(params)


def measure_if_due(
    state,
    interval: int,
    measure: Callable,
    dev_grads: PyTree | None,
    dev_grad_fn: Callable | None,
    params: PyTree | None,
    *,
    layout: GroupLayout,
    train_leaves: Sequence[Any],
):
    """``(t, measured, state')`` for step t = count + 1 (count is not advanced here).

    On a step with t divisible by ``interval`` (a measurement step):
    - without a dev source, nothing is traced and ``missed_measurements`` is incremented;
    - with one, under ``lax.cond``: if every controlled train and dev leaf is finite,
      ``state' = measure(state, dev_leaves)``; otherwise the measurement is skipped and only
      ``skipped_measurements`` is incremented.
    ``measured`` (bool scalar) is True when a measurement was taken; other steps return the
    state unchanged with ``measured`` False. ``state`` needs the two counter fields.
    """
    t = state.count + 1
    is_due = t % interval == 0
    dev_source = dev_gradient_source(dev_grads, dev_grad_fn, params)
    if dev_source is None:
        missed = state.missed_measurements + is_due.astype(jnp.int32)
        return t, jnp.asarray(False), state._replace(missed_measurements=missed)

    def due(s):
        dev_leaves = flatten_like(layout, dev_source(), "dev gradient")
        finite = all_finite(layout, train_leaves) & all_finite(layout, dev_leaves)
        new = measure(s, dev_leaves)
        skipped = s._replace(skipped_measurements=s.skipped_measurements + 1)
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, skipped), finite

    measured_state, measured = jax.lax.cond(is_due, due, lambda s: (s, jnp.asarray(False)), state)
    return t, measured, measured_state


def measurements_taken(state, count: jax.Array, interval: int) -> jax.Array:
    """Number of measurements actually taken up to step ``count`` (for debiasing):
    count // interval minus the missed and skipped ones."""
    n = count // interval
    for field in ("missed_measurements", "skipped_measurements"):
        value = getattr(state, field, None)
        if value is not None:
            n = n - value
    return n


def is_controller_first(updates: PyTree, train_grads: PyTree) -> bool:
    """True when ``updates`` holds the very arrays of ``train_grads`` (checked by identity at
    trace time): nothing transformed the gradient before the controller."""
    ups, grads = jax.tree.leaves(updates), jax.tree.leaves(train_grads)
    return bool(ups) and len(ups) == len(grads) and all(u is g for u, g in zip(ups, grads))


FIRST_WARNING = (
    "{name} received as updates the very arrays passed as train_grads: it is first in the chain, "
    "before the base optimiser. Before Adam (or any per-coordinate normalising optimiser) its "
    "per-group factors are cancelled; place it after the base optimiser: "
    "optax.chain(optax.adamw(lr), {name}(labels, ...)). (Before a linear optimiser such as SGD "
    "this order is legitimate; filter this warning then.)"
)


def check_training_inputs(name: str, updates: PyTree, train_grads: PyTree, warned: list) -> None:
    """The checks every controller's ``update`` starts with: the raw training gradient must be
    given, and a controller placed before the base optimiser (it then receives the very arrays
    of ``train_grads`` as ``updates``) warns once per transformation (``warned`` is its flag)."""
    if train_grads is None:
        raise ValueError(f"{name} needs the raw training gradient: update(..., train_grads=grads)")
    if not warned and is_controller_first(updates, train_grads):
        warned.append(True)
        # stacklevel 3: the caller of the transformation's update, not update itself.
        warnings.warn(FIRST_WARNING.format(name=name), UserWarning, stacklevel=3)


def check_state_shape(name: str, value: jax.Array, shape: tuple[int, ...]) -> None:
    if tuple(jnp.shape(value)) != shape:
        raise ValueError(
            f"state field {name} has shape {jnp.shape(value)} but the labels give "
            f"{shape}; was the state made by init with the same labels?"
        )
