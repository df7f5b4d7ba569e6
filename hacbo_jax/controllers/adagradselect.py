"""AdaGradSelect: adaptive per-step selection of the transformer blocks to update, as optax.

Reference: "AdaGradSelect: An adaptive gradient-guided layer selection method for efficient
fine-tuning of SLMs" (arXiv 2512.15764) and the authors' blog post, in the precise reading of
``docs/algorithm.md`` (AdaGradSelect), whose "our reading" choices are marked below.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hacbo_jax.controllers import _groups

PyTree = Any

# The key is stored as raw threefry data (uint32[2], the bits of the legacy PRNGKey(seed)) so that
# orbax can save it like any other array; it is wrapped again inside ``update``.
_KEY_IMPL = "threefry2x32"
SCORES = ("l2", "rms")
DRAWS = ("top_k", "without_replacement")
OTHER_MODES = ("always", "frozen", "unit")
MOMENTS = ("keep", "advance")


class AdaGradSelectState(NamedTuple):
    """State of :func:`adagradselect`.

    Attributes:
      count: int32 scalar, number of ``update`` calls so far (t - 1 before call t).
      freq: f, int32[U], how many steps each unit has been selected.
      selected: bool[U], the units updated by the last step (all False before the first).
      explored: bool scalar, whether the last step took the epsilon (top-k by gradient) branch.
      epsilon: float32 scalar, epsilon_t of the last step (epsilon_0 before the first).
      scores: float32[U], the gradient score s of the last step.
      key: uint32[2], raw PRNG key data (threefry), advanced by every step.
      inner: the wrapped optimiser's state.
    """

    count: jax.Array
    freq: jax.Array
    selected: jax.Array
    explored: jax.Array
    epsilon: jax.Array
    scores: jax.Array
    key: jax.Array
    inner: optax.OptState


def adagradselect_num_selected(pct: float, num_units: int) -> int:
    """k = max(1, floor(pct * U)), the number of units updated per step.

    Floor is our reading (it gives the blog's single block per step for a 16-block model at 10%);
    a tolerance of 1e-9 keeps products such as 0.29 * 100 = 28.999... at 29.
    """
    return max(1, math.floor(pct * num_units + 1e-9))


def adagradselect_epsilon(
    t: jax.Array | int,
    steps_per_epoch: int,
    epsilon0: float = 1.0,
    decay: float | None = None,
) -> jax.Array:
    """epsilon_t = epsilon_0 exp(-lambda (t - 1)) for t < N, and 0 for t >= N.

    N = ``steps_per_epoch`` (optimiser steps of epoch 1); lambda = ``decay``, by default
    ln(100) / (N - 1) (our reading: epsilon falls from epsilon_0 to about epsilon_0 / 100 by the
    end of epoch 1). t counts steps from 1.
    """
    if decay is None:
        decay = math.log(100.0) / (steps_per_epoch - 1)
    t32 = jnp.asarray(t, jnp.float32)
    value = epsilon0 * jnp.exp(-jnp.float32(decay) * (t32 - 1.0))
    return jnp.where(jnp.asarray(t) < steps_per_epoch, value, 0.0).astype(jnp.float32)


def adagradselect_stats(state: AdaGradSelectState) -> dict[str, Any]:
    """The selection of the last step as plain Python values, for a JSONL log.

    Returns ``{"selected": [unit indices, ascending], "counts": f (list of int), "explored":
    bool, "epsilon": float, "scores": list of float}``. Unit U - 1 is the ``"other"`` unit when
    the transformation was built with ``other_mode="unit"``.
    """
    host = jax.device_get(state)
    return {
        "selected": np.flatnonzero(np.asarray(host.selected)).tolist(),
        "counts": np.asarray(host.freq).astype(int).tolist(),
        "explored": bool(host.explored),
        "epsilon": float(host.epsilon),
        "scores": np.asarray(host.scores, np.float64).tolist(),
    }


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def adagradselect(
    labels: PyTree | Callable[[PyTree], PyTree],
    inner: optax.GradientTransformation,
    *,
    pct: float,
    steps_per_epoch: int,
    seed: int = 0,
    epsilon0: float = 1.0,
    epsilon_decay: float | None = None,
    dirichlet_alpha: float = 1.0,
    score: str = "l2",
    draw: str = "top_k",
    other_mode: str = "always",
    moments: str = "keep",
) -> optax.GradientTransformationExtraArgs:
    r"""AdaGradSelect: each step, only k of the U blocks receive the base optimiser's update.

    Wraps ``inner`` (e.g. ``optax.adamw(lr, weight_decay=wd)``) and is used *instead of* it, on
    the raw gradient (after ``clip_by_global_norm`` if wanted: a global scale keeps the ranking).
    It must wrap rather than be chained after the optimiser, since nothing after AdamW could keep
    AdamW's moments of the blocks that sit out from advancing. The units are the blocks of the
    labels ``"{block}/{submodule}"`` (sub-modules are ignored: a unit is a whole block). At step
    t (t = count + 1), with k = max(1, floor(pct U)) (:func:`adagradselect_num_selected`):

    1. s_u = ||g_u||_2 over the leaves of unit u (``score="rms"``: ||g_u||_2 / sqrt(size_u)).
    2. epsilon_t = epsilon_0 exp(-lambda (t - 1)) for t < N, 0 for t >= N, N =
       ``steps_per_epoch``, lambda = ln(100) / (N - 1) by default (:func:`adagradselect_epsilon`).
    3. key, k_b, k_d = split(key, 3); explore = uniform(k_b) < epsilon_t.
    4. explore: S = top_k(s) (``lax.top_k``: ties go to the lower index). Otherwise
       pi ~ Dirichlet(alpha_0 + f) drawn with k_d, S = top_k(pi) (``draw="without_replacement"``:
       k units drawn without replacement with probabilities pi, from a key split off k_d).
    5. f_u <- f_u + 1 for u in S.
    6. ``inner.update`` runs on the whole gradient; leaves of units in S get its update and its
       new state; leaves of other units get an update of exactly 0 (``jnp.where``, so a NaN
       cannot leak) and keep their params-shaped inner-state leaves (AdamW's mu, nu) bit for bit.
       A zero update also skips decoupled weight decay, as torch does for a parameter without a
       gradient. The inner state's non-param leaves (Adam's single ``count``) always advance: a
       named deviation from torch's per-parameter ``step``, so the bias correction of a block
       that sat out differs from torch's.

    Leaves labelled otherwise (``"other"``, e.g. embeddings, final norm) follow ``other_mode``:
    ``"always"`` updated every step (our reading), ``"frozen"`` never updated, or ``"unit"``: one
    extra unit (index U - 1) in the selection, scored by its RMS (with ``score="l2"`` the RMS is
    multiplied by sqrt of the mean block size, the L2 norm a block of average size with that RMS
    would have, so that its size does not decide the ranking; our reading).

    Args:
      labels: pytree of strings matching the params (or callable params -> such a tree). A
        scanned model's stacked leaf labelled ``"*/{submodule}"`` holds block i in slice i of
        its leading axis: block i's slice is scored and masked as block i.
      inner: the base optimiser (any ``optax.GradientTransformation``); extra keyword arguments
        of ``update`` are passed on to it.
      pct: p in (0, 1], the fraction of units updated per step (the paper uses 0.1 to 0.3).
      steps_per_epoch: N >= 2, the optimiser steps of epoch 1 (epsilon is 0 from step N on).
      seed: seed of the selection's PRNG key.
      epsilon0: epsilon_0 in (0, 1] (the paper: the first step always takes the epsilon branch).
      epsilon_decay: lambda > 0, or None for ln(100) / (N - 1).
      dirichlet_alpha: alpha_0 > 0 added to the counts (our reading: 1).
      score: ``"l2"`` (default) or ``"rms"``.
      draw: ``"top_k"`` (default, the blog) or ``"without_replacement"``.
      other_mode: ``"always"`` (default), ``"frozen"`` or ``"unit"``.
      moments: ``"keep"`` (default: unselected blocks keep their inner state) or ``"advance"``
        (the inner state advances everywhere and only the update is masked: the same as
        ``chain(adamw, mask)``, an ablation).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an :class:`AdaGradSelectState`.
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise ValueError(
            f"inner must be an optax.GradientTransformation (e.g. optax.adamw(1e-4)), "
            f"got {type(inner).__name__}"
        )
    if not 0.0 < pct <= 1.0:
        raise ValueError(f"pct must be in (0, 1], got {pct!r}")
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, (int, np.integer)):
        raise ValueError(f"steps_per_epoch must be an integer >= 2, got {steps_per_epoch!r}")
    if steps_per_epoch < 2:
        raise ValueError(f"steps_per_epoch must be an integer >= 2, got {steps_per_epoch!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not 0.0 < epsilon0 <= 1.0:
        raise ValueError(f"epsilon0 must be in (0, 1], got {epsilon0!r}")
    if epsilon_decay is not None and not epsilon_decay > 0:
        raise ValueError(f"epsilon_decay must be None or > 0, got {epsilon_decay!r}")
    if not dirichlet_alpha > 0:
        raise ValueError(f"dirichlet_alpha must be > 0, got {dirichlet_alpha!r}")
    _check_choice("score", score, SCORES)
    _check_choice("draw", draw, DRAWS)
    _check_choice("other_mode", other_mode, OTHER_MODES)
    _check_choice("moments", moments, MOMENTS)
    inner = optax.with_extra_args_support(inner)

    def units_of(layout: _groups.GroupLayout) -> tuple[tuple[int, ...], int]:
        """Per label leaf its unit (-1 for an "other" leaf outside the selection, STACKED for
        a "*/sub" leaf whose slice i along axis 0 is block i's) and U."""
        num_units = layout.num_blocks + (other_mode == "unit")
        other_unit = layout.num_blocks if other_mode == "unit" else _groups.UNCONTROLLED
        return tuple(other_unit if b == _groups.UNCONTROLLED else b for b in layout.leaf_block), (
            num_units
        )

    def unit_mask(selected: jax.Array, unit: int, num_blocks: int, ndim: int) -> jax.Array:
        """Whether a leaf (or, stacked, each block's slice of it) is updated this step."""
        if unit == _groups.UNCONTROLLED:
            return jnp.asarray(other_mode == "always")
        if unit == _groups.STACKED:  # [B, 1, ..., 1]: broadcasts over the block's slice
            return selected[:num_blocks].reshape((num_blocks,) + (1,) * (ndim - 1))
        return selected[unit]

    def init_fn(params):
        layout = _groups.resolve_layout(labels, params, None, allow_stacked=True)
        leaf_unit, num_units = units_of(layout)
        if other_mode == "unit" and num_units - 1 not in leaf_unit:
            raise ValueError(
                "other_mode='unit' needs at least one leaf labelled otherwise than "
                "'{block}/{submodule}' (e.g. 'other'); every leaf is in a block"
            )
        # One buffer per field: a train step that donates its state cannot take one buffer twice.
        return AdaGradSelectState(
            count=jnp.zeros([], jnp.int32),
            freq=jnp.zeros([num_units], jnp.int32),
            selected=jnp.zeros([num_units], bool),
            explored=jnp.zeros([], bool),
            epsilon=jnp.full([], epsilon0, jnp.float32),
            scores=jnp.zeros([num_units], jnp.float32),
            key=jax.random.key_data(jax.random.key(seed, impl=_KEY_IMPL)),
            inner=inner.init(params),
        )

    def unit_scores(leaves, leaf_unit, num_units) -> jax.Array:
        sq = jnp.zeros([num_units], jnp.float32)
        sizes = np.zeros(num_units)
        for g, u in zip(leaves, leaf_unit):
            if u == _groups.UNCONTROLLED or not _groups._is_array(g):
                continue
            squares = jnp.square(g.astype(jnp.float32))
            if u == _groups.STACKED:  # block i's share is slice i of the leading axis
                blocks = g.shape[0]
                sq = sq.at[:blocks].add(jnp.sum(squares.reshape(blocks, -1), axis=1))
                sizes[:blocks] += np.size(g) // blocks
            else:
                sq = sq.at[u].add(jnp.sum(squares))
                sizes[u] += np.size(g)
        norms = jnp.sqrt(sq)
        if score == "rms":
            return norms / jnp.sqrt(jnp.asarray(np.maximum(sizes, 1), jnp.float32))
        if other_mode == "unit":  # the "other" unit: RMS times sqrt(mean block size)
            mean_block = float(np.mean(sizes[:-1]))
            other = norms[-1] * math.sqrt(mean_block / max(sizes[-1], 1))
            norms = norms.at[-1].set(other)
        return norms

    def update_fn(updates, state, params=None, **extra_args):
        layout = _groups.resolve_layout(labels, updates, None, allow_stacked=True)
        leaf_unit, num_units = units_of(layout)
        _groups.check_state_shape("freq", state.freq, (num_units,))
        k = adagradselect_num_selected(pct, num_units)
        grad_leaves = _groups.flatten_like(layout, updates, "updates")

        t = state.count + 1
        scores = unit_scores(grad_leaves, leaf_unit, num_units)
        epsilon = adagradselect_epsilon(t, steps_per_epoch, epsilon0, epsilon_decay)
        key, key_branch, key_draw = jax.random.split(
            jax.random.wrap_key_data(state.key, impl=_KEY_IMPL), 3
        )
        explore = jax.random.uniform(key_branch) < epsilon
        _, by_score = jax.lax.top_k(scores, k)
        alpha = dirichlet_alpha + state.freq.astype(jnp.float32)
        if draw == "top_k":
            _, by_draw = jax.lax.top_k(jax.random.dirichlet(key_draw, alpha), k)
        else:
            key_pi, key_choice = jax.random.split(key_draw)
            pi = jax.random.dirichlet(key_pi, alpha)
            by_draw = jax.random.choice(key_choice, num_units, (k,), replace=False, p=pi)
        chosen = jnp.where(explore, by_score, by_draw)
        selected = jnp.zeros([num_units], bool).at[chosen].set(True)

        inner_updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
        mask_tree = layout.treedef.unflatten(
            [
                unit_mask(selected, u, layout.num_blocks, jnp.ndim(g) if _groups._is_array(g) else 1)
                for u, g in zip(leaf_unit, grad_leaves)
            ]
        )
        update_leaves = _groups.flatten_like(layout, inner_updates, "inner updates")
        masked = [
            jnp.where(m, u, jnp.zeros_like(u)) if _groups._is_array(u) else u
            for u, m in zip(update_leaves, layout.treedef.flatten_up_to(mask_tree))
        ]
        if moments == "keep":
            keep_new = optax.tree_utils.tree_map_params(
                inner,
                lambda _, m: m,
                inner_state,
                mask_tree,
                transform_non_params=lambda _: jnp.asarray(True),
            )
            inner_state = jax.tree.map(
                lambda new, old, m: jnp.where(m, new, old), inner_state, state.inner, keep_new
            )
        new_state = AdaGradSelectState(
            count=t.astype(jnp.int32),
            freq=(state.freq + selected.astype(jnp.int32)).astype(jnp.int32),
            selected=selected,
            explored=explore,
            epsilon=epsilon,
            scores=scores,
            key=jax.random.key_data(key),
            inner=inner_state,
        )
        return layout.treedef.unflatten(masked), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
