"""Shared machinery of the HACBO and BLAC transformations.

Label parsing (a static leaf -> (block, sub-module) layout), the per-block sign-cosine and
per-group gradient norms of a measurement, per-tensor fake int8, the per-group scaling of an
update and the global update-norm budget. Spec: ``shared/spec/controllers.md``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Labels = PyTree | Callable[[PyTree], PyTree]

_CONTROLLED_LABEL = re.compile(r"^(\d+)/(.+)$")
UNCONTROLLED = -1


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """Static map from the leaves of a label tree to controller groups.

    Attributes:
      treedef: structure of the label tree; the parameter/update trees are flattened *up to* it,
        so a leaf position may hold an array or an empty subtree (``optax.MaskedNode``).
      leaf_block: per label leaf, its block index, or ``UNCONTROLLED``.
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


def parse_labels(label_tree: PyTree, submodules: Sequence[str] | None = None) -> GroupLayout:
    """Builds the static layout of a tree whose leaves are label strings.

    A leaf ``"{block}/{submodule}"`` (e.g. ``"3/mlp"``) is controlled; any other string is not.
    Blocks must be numbered 0..B-1. Sub-modules are ordered by ``submodules`` if given, else sorted.

    Raises:
      ValueError: for a non-string leaf, no controlled leaf, non-contiguous block numbers, or a
        sub-module missing from ``submodules``.
    """
    leaves, treedef = jax.tree.flatten(label_tree)
    parsed: list[tuple[int, str] | None] = []
    for leaf in leaves:
        if not isinstance(leaf, str):
            raise ValueError(
                f"label leaves must be strings like '3/mlp' or 'other', got {leaf!r} "
                f"of type {type(leaf).__name__}"
            )
        match = _CONTROLLED_LABEL.match(leaf)
        parsed.append(None if match is None else (int(match.group(1)), match.group(2)))
    controlled = [p for p in parsed if p is not None]
    if not controlled:
        raise ValueError("no leaf is labelled '{block}/{submodule}'; nothing to control")
    blocks = sorted({b for b, _ in controlled})
    if blocks != list(range(len(blocks))):
        raise ValueError(f"blocks must be numbered 0..B-1 without gaps, got block numbers {blocks}")
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
    return GroupLayout(treedef, leaf_block, leaf_sub, len(blocks), names)


def resolve_layout(labels: Labels, tree: PyTree, submodules: Sequence[str] | None) -> GroupLayout:
    """Parses ``labels`` (a label tree, or a callable of ``tree`` returning one)."""
    label_tree = labels(tree) if callable(labels) else labels
    return parse_labels(label_tree, submodules)


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

    Raises:
      ValueError: if a group has no array leaf (its curvature would stay 0 and take all the
        curvature weight of its block).
    """
    sizes = np.zeros((layout.num_blocks, layout.num_submodules))
    present = np.zeros((layout.num_blocks, layout.num_submodules), bool)
    for leaf, b, m in zip(leaves, layout.leaf_block, layout.leaf_submodule):
        if b != UNCONTROLLED and _is_array(leaf):
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


def sign_cosine_and_sq_norms(
    layout: GroupLayout, train_leaves: Sequence[Any], dev_leaves: Sequence[Any]
) -> tuple[jax.Array, jax.Array]:
    """Per-block sign-cosine f32[B] and per-group squared L2 norm of g_train f32[B, M].

    cos_b = sum_i sign(gt_i) sign(gd_i) / (sqrt(nnz(gt)) sqrt(nnz(gd))) over all coordinates of
    block b (the L2 norm of a sign vector is the square root of its number of non-zeros), and
    cos_b = 0 when either count is 0. Sign products and counts are summed in float32: exact
    while a leaf has fewer than 2^24 coordinates (beyond, relative error ~1e-7), and about 1.5x
    faster on CPU than int32 sums.
    """
    num_b, num_m = layout.num_blocks, layout.num_submodules
    dots, nnz_t, nnz_d, sq, blocks, groups = [], [], [], [], [], []
    for gt, gd, b, m in zip(train_leaves, dev_leaves, layout.leaf_block, layout.leaf_submodule):
        if b == UNCONTROLLED or not _is_array(gt):
            continue
        if not _is_array(gd) or jnp.shape(gd) != jnp.shape(gt):
            raise ValueError(
                f"dev gradient leaf {gd!r} does not match train gradient shape {jnp.shape(gt)}"
            )
        gt32, gd32 = gt.astype(jnp.float32), gd.astype(jnp.float32)
        st, sd = jnp.sign(gt32), jnp.sign(gd32)
        dots.append(jnp.sum(st * sd))
        nnz_t.append(jnp.sum(st * st))
        nnz_d.append(jnp.sum(sd * sd))
        sq.append(jnp.sum(gt32 * gt32))
        blocks.append(b)
        groups.append(b * num_m + m)
    block_ids = np.asarray(blocks)
    dot_b = jnp.zeros(num_b, jnp.float32).at[block_ids].add(jnp.stack(dots))
    nt_b = jnp.zeros(num_b, jnp.float32).at[block_ids].add(jnp.stack(nnz_t))
    nd_b = jnp.zeros(num_b, jnp.float32).at[block_ids].add(jnp.stack(nnz_d))
    denom = jnp.sqrt(nt_b) * jnp.sqrt(nd_b)
    cos = jnp.where(denom > 0, dot_b / jnp.where(denom > 0, denom, 1.0), 0.0)
    sq_bm = jnp.zeros(num_b * num_m, jnp.float32).at[np.asarray(groups)].add(jnp.stack(sq))
    return cos, sq_bm.reshape(num_b, num_m)


def fake_int8(x: jax.Array) -> jax.Array:
    """Symmetric per-tensor int8 quantise-dequantise: s = max|x| / 127, x -> round(x / s) * s.

    ``x`` is returned unchanged when max|x| = 0. Rounding is half-to-even (``jnp.round``).
    """
    scale = jnp.max(jnp.abs(x)) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    return jnp.where(scale > 0, jnp.round(x / safe) * safe, x)


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
    identity, which XLA forwards without a copy, so ordinary steps pay for the multiply only.
    Uncontrolled leaves are returned as they are; every leaf keeps its dtype (for bf16 leaves the
    quantiser sees multiplier * u rounded to bf16).
    """
    out = list(update_leaves)
    by_block: dict[int, list[int]] = {}
    for i, (u, b) in enumerate(zip(update_leaves, layout.leaf_block)):
        if b != UNCONTROLLED and _is_array(u):
            out[i] = (multipliers[b, layout.leaf_submodule[i]] * u.astype(jnp.float32)).astype(
                u.dtype
            )
            by_block.setdefault(b, []).append(i)
    if probation is None:
        return out

    def quantised(leaves):
        return [(gamma * fake_int8(x.astype(jnp.float32))).astype(x.dtype) for x in leaves]

    for b, idx in by_block.items():
        new = jax.lax.cond(probation[b], quantised, lambda leaves: leaves, [out[i] for i in idx])
        for i, x in zip(idx, new):
            out[i] = x
    return out


def clip_to_budget(leaves: Sequence[Any], budget: float | None) -> list[Any]:
    """Scales the whole update to global L2 norm ``budget`` when its norm exceeds it."""
    if budget is None:
        return list(leaves)
    arrays = [u for u in leaves if _is_array(u)]
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(u.astype(jnp.float32))) for u in arrays))
    factor = jnp.where(norm > budget, budget / jnp.where(norm > 0, norm, 1.0), 1.0)
    return [(factor * u.astype(jnp.float32)).astype(u.dtype) if _is_array(u) else u for u in leaves]


def validate_budget(budget: float | None) -> None:
    if budget is not None and not budget > 0:
        raise ValueError(f"update_norm_budget must be None or > 0, got {budget!r}")


def validate_positive_int(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def validate_rho(rho: float) -> None:
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"rho must be in [0, 1), got {rho!r}")


def dev_gradient_source(
    dev_grads: PyTree | None, dev_grad_fn: Callable | None, params: PyTree | None
) -> Callable[[], PyTree]:
    """Returns a thunk producing the micro-dev gradient, validating the inputs at trace time.

    The step is traced for any count, so a missing dev gradient is an error even when this
    particular step would not measure: a jitted step must be able to measure.
    """
    if dev_grads is not None and dev_grad_fn is not None:
        raise ValueError("pass either dev_grads or dev_grad_fn, not both")
    if dev_grads is not None:
        return lambda: dev_grads
    if dev_grad_fn is None:
        raise ValueError(
            "a measurement step needs the micro-dev gradient: pass dev_grads=<grads> or "
            "dev_grad_fn=<params -> grads> to update (dev_grad_fn is only called on measurement "
            "steps, inside lax.cond)"
        )
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
):
    """``(t, is_measurement, state')``: ``measure(state, dev_source)`` under ``lax.cond`` on steps
    with t = count + 1 divisible by ``interval``, the state unchanged otherwise; count is not
    advanced here.

    Outside jit, a step that does not measure may omit the dev gradient (the spec allows it);
    traced, the step must be able to measure, so :func:`dev_gradient_source` insists on one.
    """
    t = state.count + 1
    is_measurement = t % interval == 0
    if (
        dev_grads is None
        and dev_grad_fn is None
        and not isinstance(t, jax.core.Tracer)
        and not bool(is_measurement)
    ):
        return t, is_measurement, state
    dev_source = dev_gradient_source(dev_grads, dev_grad_fn, params)
    return (
        t,
        is_measurement,
        jax.lax.cond(is_measurement, lambda s: measure(s, dev_source), lambda s: s, state),
    )


def check_state_shape(name: str, value: jax.Array, shape: tuple[int, ...]) -> None:
    if tuple(jnp.shape(value)) != shape:
        raise ValueError(
            f"state field {name} has shape {jnp.shape(value)} but the labels give "
            f"{shape}; was the state made by init with the same labels?"
        )
