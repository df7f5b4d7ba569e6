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
      selected_after_epoch1: int32[U], how many steps t > N (after epoch 1,
        N = ``steps_per_epoch``) selected each unit; 0 everywhere up to step N. A diagnostic,
        read by nothing in the update: units still at 0 long after epoch 1 show the lock-in
        of the default ``draw="top_k"`` (:func:`adagradselect_stats` reports their number;
        ``draw="without_replacement"`` spreads the selection). Defaults to None so that a
        state can be written by hand with the first eight fields; ``update`` fills it in.
    """

    count: jax.Array
    freq: jax.Array
    selected: jax.Array
    explored: jax.Array
    epsilon: jax.Array
    scores: jax.Array
    key: jax.Array
    inner: optax.OptState
    selected_after_epoch1: jax.Array | None = None


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

    Once a step after epoch 1 has been taken (t > N), two more keys report the lock-in of the
    default ``draw="top_k"`` (docs/controller-behaviour.md): ``"selected_after_epoch1"`` (list
    of int, the state's per-unit counts of steps t > N) and ``"never_selected_after_epoch1"``
    (int, the number of units with a count of 0). Up to step N they are absent.
    """
    host = jax.device_get(state)
    stats = {
        "selected": np.flatnonzero(np.asarray(host.selected)).tolist(),
        "counts": np.asarray(host.freq).astype(int).tolist(),
        "explored": bool(host.explored),
        "epsilon": float(host.epsilon),
        "scores": np.asarray(host.scores, np.float64).tolist(),
    }
    after = host.selected_after_epoch1
    if after is not None and int(np.sum(after)) > 0:  # each step t > N adds k >= 1
        after = np.asarray(after).astype(int)
        stats["selected_after_epoch1"] = after.tolist()
        stats["never_selected_after_epoch1"] = int(np.sum(after == 0))
    return stats


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


# What optax.inject_hyperparams must leave static (see the docstring of adagradselect).
STATIC_ARGS = ("labels", "pct", "seed")
_STATIC_FIX = (
    "; under optax.inject_hyperparams declare it static: "
    f"optax.inject_hyperparams(adagradselect, static_args={STATIC_ARGS!r})(...)"
)


def _is_jax_scalar(value: Any) -> bool:
    """A jax scalar, as ``optax.inject_hyperparams`` passes an injected hyper-parameter (a
    concrete array in ``init``, a tracer in a jitted ``update``): not checked."""
    return isinstance(value, jax.Array) and jnp.ndim(value) == 0


def _check_number(name: str, value: Any, ok: Callable[[Any], bool], allowed: str) -> None:
    """Checks a Python or NumPy number at construction (message "{name} must be {allowed}");
    an injected jax scalar passes unchecked."""
    if _is_jax_scalar(value):
        return
    if not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_static(name: str, value: Any, why: str) -> None:
    if isinstance(value, jax.Array):
        raise ValueError(f"{name} {why}, so it cannot be a jax array{_STATIC_FIX}")


def _keep_masks(
    inner: optax.GradientTransformation,
    inner_state: optax.OptState,
    layout: _groups.GroupLayout,
    leaf_masks: list[Any],
    update_leaves: list[Any],
) -> optax.OptState:
    """Per leaf of ``inner_state``: where the new value is kept (a bool array broadcasting to the
    leaf without changing its shape), or Python True for "take the new value everywhere".

    ``optax.tree_utils.tree_map_params`` finds the inner state's copies of the parameter tree
    (AdamW's mu and nu; inside ``optax.masked`` they hold ``MaskedNode`` where a parameter is
    masked out). In each copy, at a parameter's position:

    - an array of the parameter's shape gets the parameter's mask (per block for a stacked
      leaf);
    - anything else there is the parameter's own statistic in another form (sm3's list of
      per-axis accumulators, adafactor's factored rows and columns): it gets the mask too when
      the parameter belongs to one unit (a scalar mask), and advances when the parameter is
      stacked (its slices belong to different blocks, which such a statistic does not separate);
    - a ``MaskedNode`` has no leaf: nothing to keep.

    Every leaf outside those copies (Adam's count) advances.
    """

    def at_parameter(x, mask, u):
        if _groups._is_array(x) and _groups._is_array(u) and jnp.shape(x) == jnp.shape(u):
            return mask
        whole = jnp.ndim(mask) == 0  # the parameter belongs to one unit
        return jax.tree.map(lambda _: mask if whole else True, x)

    def in_params_copy(copy):
        at_leaves = _groups.flatten_like(layout, copy, "the inner state's copy of the params")
        return layout.treedef.unflatten(
            [at_parameter(x, m, u) for x, m, u in zip(at_leaves, leaf_masks, update_leaves)]
        )

    return optax.tree_utils.tree_map_params(
        inner,
        in_params_copy,
        inner_state,
        transform_non_params=lambda _: True,
        is_leaf=lambda _: True,  # in_params_copy receives each copy whole
    )


def _branch_and_draw(
    state: AdaGradSelectState,
    *,
    k: int,
    steps_per_epoch: Any,
    epsilon0: Any,
    epsilon_decay: Any,
    dirichlet_alpha: Any,
    draw: str,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Steps 2-4 of :func:`adagradselect` that need no gradient: ``(next key, epsilon_t,
    explore, the k units of the Dirichlet draw)``. Shared by the update and by
    :func:`adagradselect_idle_units`, so that a selection planned before the backward pass is
    the one the update makes."""
    t = state.count + 1
    num_units = state.freq.shape[0]
    epsilon = adagradselect_epsilon(t, steps_per_epoch, epsilon0, epsilon_decay)
    key, key_branch, key_draw = jax.random.split(
        jax.random.wrap_key_data(state.key, impl=_KEY_IMPL), 3
    )
    explore = jax.random.uniform(key_branch) < epsilon
    alpha = dirichlet_alpha + state.freq.astype(jnp.float32)
    if draw == "top_k":
        _, by_draw = jax.lax.top_k(jax.random.dirichlet(key_draw, alpha), k)
    else:
        key_pi, key_choice = jax.random.split(key_draw)
        pi = jax.random.dirichlet(key_pi, alpha)
        by_draw = jax.random.choice(key_choice, num_units, (k,), replace=False, p=pi)
    return key, epsilon, explore, by_draw


def adagradselect_idle_units(
    state: AdaGradSelectState,
    *,
    pct: float,
    steps_per_epoch: int,
    epsilon0: float = 1.0,
    epsilon_decay: float | None = None,
    dirichlet_alpha: float = 1.0,
    draw: str = "top_k",
) -> jax.Array:
    """bool[U]: the units the *next* update of :func:`adagradselect` (same hyper-parameters)
    will leave out, known before its gradient exists.

    The branch (uniform < epsilon_t) and the Dirichlet draw depend only on the state's key,
    count and frequencies, so on a Dirichlet step the selection is known in advance and every
    other unit's update is exactly zero: a training step can skip those units' weight gradients
    (``hacbo_jax.models.qwen3``'s ``weight_grads``). On an epsilon (top-k by gradient norm) step
    the selection needs the gradient itself: all False (nothing can be skipped).
    """
    num_units = state.freq.shape[0]
    _, _, explore, by_draw = _branch_and_draw(
        state,
        k=adagradselect_num_selected(pct, num_units),
        steps_per_epoch=steps_per_epoch,
        epsilon0=epsilon0,
        epsilon_decay=epsilon_decay,
        dirichlet_alpha=dirichlet_alpha,
        draw=draw,
    )
    drawn = jnp.zeros([num_units], bool).at[by_draw].set(True)
    return jnp.where(explore, False, ~drawn)


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
       that sat out differs from torch's. What is kept is found with ``optax.tree_map_params``
       (the copies of the parameter tree in the inner state): at a parameter's position, an
       array of its shape is kept (slice by slice for a stacked leaf); another statistic of
       that parameter (sm3's per-axis accumulators, adafactor's factored rows and columns) is
       kept whole when the parameter belongs to one unit and advances for a stacked leaf, whose
       slices such a statistic does not separate; ``optax.masked``'s ``MaskedNode`` holds
       nothing.

    It composes with ``optax.masked`` and ``optax.partition`` (a masked-out leaf is left to the
    wrapper) and with ``optax.tree_map_params`` whether ``labels`` is a tree or a callable.
    ``state.selected_after_epoch1`` counts the selections after epoch 1; units that stay at 0
    show the lock-in of the default ``draw="top_k"`` (docs/controller-behaviour.md).

    Under ``optax.inject_hyperparams``, ``steps_per_epoch``, ``epsilon0``, ``epsilon_decay``
    (when a number) and ``dirichlet_alpha`` are injectable (they only enter jnp arithmetic, and
    are checked only when they are Python or NumPy numbers). ``pct`` fixes k, a shape, and
    ``seed`` is read once by ``init``: both must be static, and so must a callable ``labels``
    (inject_hyperparams would take a callable for a schedule). Passed as jax arrays, ``pct``
    and ``seed`` raise a ValueError naming the fix: ``optax.inject_hyperparams(adagradselect,
    static_args=("labels", "pct", "seed"))(labels, inner, pct=..., steps_per_epoch=...)``.

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
    _check_static("pct", pct, "fixes k, the number of units selected per step (a shape)")
    if not 0.0 < pct <= 1.0:
        raise ValueError(f"pct must be in (0, 1], got {pct!r}")
    if _is_jax_scalar(steps_per_epoch):
        if not jnp.issubdtype(jnp.result_type(steps_per_epoch), jnp.integer):
            raise ValueError(f"steps_per_epoch must be an integer >= 2, got {steps_per_epoch!r}")
    elif isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, (int, np.integer)):
        raise ValueError(f"steps_per_epoch must be an integer >= 2, got {steps_per_epoch!r}")
    elif steps_per_epoch < 2:
        raise ValueError(f"steps_per_epoch must be an integer >= 2, got {steps_per_epoch!r}")
    _check_static("seed", seed, "is read once, by init, to make the PRNG key")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    _check_number("epsilon0", epsilon0, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
    if epsilon_decay is not None:
        _check_number("epsilon_decay", epsilon_decay, lambda v: v > 0, "None or > 0")
    _check_number("dirichlet_alpha", dirichlet_alpha, lambda v: v > 0, "> 0")
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
        if _groups.is_params_placeholder(params):  # optax.tree_map_params: structure only
            num_units = 0
        else:
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
            selected_after_epoch1=jnp.zeros([num_units], jnp.int32),
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
        key, epsilon, explore, by_draw = _branch_and_draw(
            state,
            k=k,
            steps_per_epoch=steps_per_epoch,
            epsilon0=epsilon0,
            epsilon_decay=epsilon_decay,
            dirichlet_alpha=dirichlet_alpha,
            draw=draw,
        )
        _, by_score = jax.lax.top_k(scores, k)
        chosen = jnp.where(explore, by_score, by_draw)
        selected = jnp.zeros([num_units], bool).at[chosen].set(True)

        inner_updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
        leaf_masks = [
            unit_mask(selected, u, layout.num_blocks, jnp.ndim(g) if _groups._is_array(g) else 1)
            for u, g in zip(leaf_unit, grad_leaves)
        ]
        update_leaves = _groups.flatten_like(layout, inner_updates, "inner updates")
        masked = [
            jnp.where(m, u, jnp.zeros_like(u)) if _groups._is_array(u) else u
            for u, m in zip(update_leaves, leaf_masks)
        ]
        if moments == "keep":
            keep_new = _keep_masks(inner, inner_state, layout, leaf_masks, grad_leaves)
            inner_state = jax.tree.map(
                lambda new, old, m: new if m is True else jnp.where(m, new, old),
                inner_state,
                state.inner,
                keep_new,
            )
        previous_after = state.selected_after_epoch1
        if previous_after is None:  # a hand-written state
            previous_after = jnp.zeros([num_units], jnp.int32)
        after_epoch1 = (t > steps_per_epoch) & selected
        new_state = AdaGradSelectState(
            count=t.astype(jnp.int32),
            freq=(state.freq + selected.astype(jnp.int32)).astype(jnp.int32),
            selected=selected,
            explored=explore,
            epsilon=epsilon,
            scores=scores,
            key=jax.random.key_data(key),
            inner=inner_state,
            selected_after_epoch1=(previous_after + after_epoch1.astype(jnp.int32)).astype(
                jnp.int32
            ),
        )
        return layout.treedef.unflatten(masked), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
