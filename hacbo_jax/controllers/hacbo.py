"""HACBO: hierarchical agreement-curvature budgeting, as an optax transformation.

Reference: "Elastic hierarchical agreement-curvature budgeting for trust-region controlled
fine-tuning" (HACBO), Algorithm 1, in the precise reading of ``docs/algorithm.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hacbo_jax.controllers import _groups

PyTree = Any


class HACBOState(NamedTuple):
    """State of :func:`hacbo`; float32 regardless of the params' dtype.

    Attributes:
      count: int32 scalar, number of applied updates so far (t - 1 before call t); a step that
        ``optax.apply_if_finite`` rejects leaves the whole state, count included, unchanged.
      agreement: a, f32[B], EMA of max(0, sign-cosine) per block (raw, never debiased).
      curvature: c, f32[B, M], EMA of the training-gradient norm per (block, sub-module) (raw).
      neg_count: z, int32[B], consecutive measurements with a_b < theta_neg.
      probation: p, bool[B] (after this step's probation exit: it applies to the next step).
      layer_weights: w, f32[B], a / sum(a) at the last measurement with sum(a) > 0 (init 1/B).
      cosine: f32[B], the sign-cosine of the last measurement taken (init 0).
      missed_measurements: int32 scalar, measurement steps reached without a dev gradient
        (``update`` called with neither ``dev_grads`` nor ``dev_grad_fn``): nothing measured.
      skipped_measurements: int32 scalar, measurement steps whose train or dev gradient was not
        finite: skipped, the rest of the state unchanged.
      multipliers: f32[B, M], the multipliers applied at the last step, before a block in
        probation's gamma * fake_int8(.) and before the budget (what the logs should show;
        :func:`hacbo_multipliers` of the state gives the next step's).
      budget_scale: f32 scalar, the factor ``update_norm_budget`` applied at the last step (1
        when under budget or off).
      min_submodule_share: f32[B], min_m v_{b,m}: the smallest within-block share (step 5 of
        docs/algorithm.md) that the last step applied in each block; v changes only on
        measurement steps, so this is its value at the last measurement (1/M before the first
        update). A diagnostic, read by nothing in the update: a value near 0 (1e-6 and below)
        means a sub-module with gradient left is starved because a sibling's curvature EMA fell
        near 0 (:func:`hacbo_starvation`; ``curvature_floor`` avoids it).
      true_cosine: f32[B], with ``record_true_cosine`` only (None otherwise): the cosine of the
        train and dev gradients themselves at the last measurement taken (init 0), beside
        ``cosine``, their sign-cosine. A diagnostic, read by nothing in the update.
      probation_steps: int32[B], the number of applied updates in which block b was in
        probation (scaled by gamma * fake_int8). ``probation`` is the state *after* the exit
        test, so a block that enters and leaves at the same measurement (z reaches F while
        cos_b > 0) never shows in it; this count still sees that update. A diagnostic, read by
        nothing in the update.

    The last seven fields default to None so that a state can be written by hand with the first
    seven; ``update`` fills them in (zeros, 1 for ``budget_scale``, 1/M for
    ``min_submodule_share``).
    """

    count: jax.Array
    agreement: jax.Array
    curvature: jax.Array
    neg_count: jax.Array
    probation: jax.Array
    layer_weights: jax.Array
    cosine: jax.Array
    missed_measurements: jax.Array | None = None
    skipped_measurements: jax.Array | None = None
    multipliers: jax.Array | None = None
    budget_scale: jax.Array | None = None
    min_submodule_share: jax.Array | None = None
    true_cosine: jax.Array | None = None
    probation_steps: jax.Array | None = None


def _completed(state: HACBOState) -> HACBOState:
    """Fills the optional fields of a hand-written state."""
    num_b, num_m = jnp.shape(state.curvature)
    defaults = {
        "missed_measurements": lambda: jnp.zeros([], jnp.int32),
        "skipped_measurements": lambda: jnp.zeros([], jnp.int32),
        "multipliers": lambda: jnp.zeros([num_b, num_m], jnp.float32),
        "budget_scale": lambda: jnp.ones([], jnp.float32),
        "min_submodule_share": lambda: jnp.full([num_b], 1.0 / max(num_m, 1), jnp.float32),
        "probation_steps": lambda: jnp.zeros([num_b], jnp.int32),
    }
    missing = {k: make() for k, make in defaults.items() if getattr(state, k) is None}
    return state._replace(**missing) if missing else state


def _debias_divisor(n: jax.Array, rho: float, debias: bool) -> jax.Array:
    """1 - rho^n for n measurements taken; 1 when n = 0 or debias is off."""
    if not debias:
        return jnp.ones([], jnp.float32)
    n = jnp.asarray(n).astype(jnp.float32)
    return jnp.where(n > 0, 1.0 - jnp.asarray(rho, jnp.float32) ** n, 1.0)


def _is_zero(x: Any) -> bool:
    return not isinstance(x, jax.Array) and float(x) == 0.0


def hacbo_submodule_shares(
    state: HACBOState,
    *,
    eps: float = 1e-8,
    rho: float = 0.8,
    debias: bool = False,
    curvature_weighting: bool = True,
    interval: int = 30,
    curvature_floor: float = 0.0,
) -> jax.Array:
    """The within-block split v f32[B, M] that a HACBO state gives (step 5 of docs/algorithm.md).

    v_{b,m} = u_{b,m} / sum_m' u_{b,m'}, u = 1 / (max(c, floor * mean_m' c_{b,m'}) + eps)
    (floor = ``curvature_floor``, default 0: the reference's 1 / (c + eps)), or uniform 1/M if
    ``curvature_weighting`` is False; with ``debias``, c is first divided by 1 - rho^n. The
    keyword arguments must match the transformation's. Each row sums to 1.
    """
    curvature = state.curvature / _debias_divisor(
        _groups.measurements_taken(state, state.count, interval), rho, debias
    )
    if not curvature_weighting:
        return jnp.full_like(state.curvature, 1.0 / state.curvature.shape[1])
    if not _is_zero(curvature_floor):
        floor = curvature_floor * jnp.mean(curvature, axis=1, keepdims=True)
        curvature = jnp.maximum(curvature, floor)
    inverse = 1.0 / (curvature + eps)
    return inverse / jnp.sum(inverse, axis=1, keepdims=True)


def _multipliers_from_shares(
    state: HACBOState, within_block: jax.Array, probation_share: str
) -> jax.Array:
    """Steps 6-7: L_active * w_b * v_{b,m} (v_b for a block in probation under "uniform")."""
    l_active = jnp.sum(~state.probation).astype(jnp.float32)
    multipliers = l_active * state.layer_weights[:, None] * within_block
    if probation_share == "uniform":
        multipliers = jnp.where(state.probation[:, None], within_block, multipliers)
    return multipliers.astype(jnp.float32)


def hacbo_multipliers(
    state: HACBOState,
    *,
    eps: float = 1e-8,
    rho: float = 0.8,
    debias: bool = False,
    curvature_weighting: bool = True,
    interval: int = 30,
    curvature_floor: float = 0.0,
    probation_share: str = "weights",
) -> jax.Array:
    """Per-group update multipliers f32[B, M] that a HACBO state gives (steps 5-7 of docs/algorithm.md).

    multiplier_{b,m} = L_active * w_b * v_{b,m}, with v_{b,m} = u_{b,m} / sum_m' u_{b,m'},
    u = 1 / (max(c, floor * mean_m' c_{b,m'}) + eps) (floor = ``curvature_floor``, default 0:
    the reference's 1 / (c + eps); uniform 1/M if ``curvature_weighting`` is False) and
    L_active = #{b : not p_b}. With ``probation_share="uniform"`` a block in probation gets v_b
    instead (its share with all blocks active and uniform weights). Leaves of a block in
    probation additionally get gamma * fake_int8(.) in the update. The keyword arguments must
    match the transformation's: with ``debias``, c is divided by 1 - rho^n, n = measurements
    taken so far (count // interval less the missed and skipped ones).

    These are the multipliers the *next* step would apply; the ones the last step applied are
    ``state.multipliers`` (they differ after a probation exit on a measurement step).
    """
    within_block = hacbo_submodule_shares(
        state,
        eps=eps,
        rho=rho,
        debias=debias,
        curvature_weighting=curvature_weighting,
        interval=interval,
        curvature_floor=curvature_floor,
    )
    return _multipliers_from_shares(state, within_block, probation_share)


STARVATION_THRESHOLD = 1e-3


def hacbo_starvation(
    state: HACBOState,
    threshold: float = STARVATION_THRESHOLD,
    submodules: Sequence[str] | None = None,
) -> str | None:
    """Host-side check for sub-module starvation; a warning text, or None when there is none.

    Starvation (docs/controller-behaviour.md): under the reference rule v ~ 1 / (c + eps), a
    sub-module whose curvature EMA c fell near 0 (it converged, e.g. on a convex objective)
    takes nearly the whole share of its block, and its siblings, which still have gradient,
    get about c / c_sibling of it (1e-6 to 1e-8 has been seen): they stop training. The text
    names the blocks whose smallest share ``state.min_submodule_share`` is below ``threshold``.

    Reads the state on the host (``jax.device_get``): call it where the loop logs, not inside a
    jitted step. A single hit can be a transient; a training loop should warn when it persists
    over several log points. ``submodules`` (the names in the transformation's order) only
    makes the text more specific. Returns None for a hand-written state not yet updated.
    """
    shares = state.min_submodule_share
    if shares is None:
        return None
    shares = np.asarray(jax.device_get(shares), np.float64)
    starved = np.flatnonzero(shares < threshold)
    if starved.size == 0:
        return None
    where = f"block {int(starved[0])}" if starved.size == 1 else f"blocks {starved.tolist()}"
    names = f" (sub-modules {list(submodules)})" if submodules is not None else ""
    return (
        f"HACBO starvation: in {where}{names} a sub-module gets less than {threshold:g} of its "
        f"block's share (smallest {float(np.min(shares)):.3g}): a sibling's curvature EMA fell "
        "near 0 and 1 / (c + eps) gives that sibling nearly the whole block, so sub-modules "
        "that still have gradient barely train. If it persists, set curvature_floor (e.g. "
        "0.1); see docs/controller-behaviour.md."
    )


def hacbo_idle_blocks(state: HACBOState, *, gamma: float, probation: bool = True) -> jax.Array:
    """bool[B]: the blocks whose update the next HACBO step will set to exactly 0 whatever the
    gradient, if that step does not measure: with ``gamma = 0`` the blocks in probation
    (gamma * fake_int8(.) = 0); with gamma > 0, or without probation, none. Probation changes
    only on measurement steps, and a measurement reads every block's gradient (a block leaves
    probation on its sign-cosine), so only the steps between measurements may skip. ``gamma``
    must be a Python or NumPy number (a skip decision is made when the step is built)."""
    if _groups._is_concrete_number(gamma) and float(gamma) == 0.0 and probation:
        return jnp.asarray(state.probation, bool)
    return jnp.zeros(jnp.shape(state.probation), bool)


def hacbo(
    labels: PyTree | Callable[[PyTree], PyTree],
    *,
    rho: float = 0.8,
    interval: int = 30,
    theta_neg: float = 0.04,
    patience: int = 6,
    gamma: float = 0.1,
    eps: float = 1e-8,
    curvature_norm: str = "rms",
    debias: bool = False,
    update_norm_budget: float | None = None,
    submodules: Sequence[str] | None = None,
    curvature_weighting: bool = True,
    probation: bool = True,
    curvature_floor: float = 0.0,
    probation_share: str = "weights",
    record_true_cosine: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""HACBO: rescales each (block, sub-module) group of the base optimiser's update.

    Chain it *after* the base optimiser (``optax.chain(optax.adamw(lr), hacbo(labels))``): a
    per-group factor applied to the gradient before Adam is cancelled by Adam's per-coordinate
    normalisation (placed first, it warns once). ``update`` takes extra keyword arguments:
    ``train_grads`` (the raw training gradient) and the micro-dev gradient, either ``dev_grads``
    or ``dev_grad_fn`` (params -> grads, called only on measurement steps, inside ``lax.cond``).
    With neither, the traced update contains no measurement: a measurement step reached that way
    measures nothing and is counted in ``missed_measurements`` (so a loop may compile one step
    without and one with the dev gradient). The update is meant to be jitted: called eagerly,
    ``dev_grad_fn`` is traced again on every call.

    At step t (t = count + 1, applied steps), if t mod K = 0 (K = ``interval``), a measurement
    (skipped, and counted in ``skipped_measurements``, if a train or dev gradient is not finite):

    1. cos_b = <sign g_train(b), sign g_dev(b)> / (||sign g_train(b)|| ||sign g_dev(b)||)
       (0 if a norm is 0, clipped to [-1, 1]); a_b <- rho a_b + (1 - rho) max(0, cos_b).
    2. c_{b,m} <- rho c_{b,m} + (1 - rho) n_{b,m}, n = ||g_train(b,m)||_2 / sqrt(size) ("rms")
       or ||g_train(b,m)||_2 ("l2").
    3. z_b <- z_b + 1 if a_b < theta_neg else 0; p_b <- True if z_b >= F (F = ``patience``).
    4. If S = sum_j a_j > 0: w_b = a_b / S, else w is kept.

    Every step: multiplier_{b,m} = L_active w_b v_{b,m} (:func:`hacbo_multipliers`); a leaf of
    group (b, m) becomes multiplier * u, or gamma * fake_int8(multiplier * u) if p_b. Then, on
    measurement steps only, a block in probation leaves it (p_b <- False, z_b <- 0) if cos_b > 0
    or mean_m c_{b,m} < median_b' mean_m c_{b',m}; this affects the *next* step's update. Last,
    with ``update_norm_budget`` = lambda, the update this transformation sees is clipped to
    global L2 norm lambda (inside ``optax.masked`` that is only the masked subset: for the reference's
    whole-update budget put ``optax.clip_by_global_norm(lambda)`` last in the chain instead).

    With ``debias=True``, wherever a and c are *used* (the theta_neg test, w, v and the
    probation-exit median test) they are divided by 1 - rho^n, n = number of measurements taken
    so far including this step's; the stored EMAs stay raw.

    ``state.min_submodule_share`` (min_m v_{b,m} per block, computed in the update, read by
    nothing) shows the starvation the reference rule can cause: on a convex objective a
    converged sub-module's c falls towards 0 (about 1e-7 has been seen), 1 / (c + eps) hands it
    nearly the whole block and its siblings stop training. :func:`hacbo_starvation` turns the
    statistic into a warning for the logs; ``curvature_floor`` (e.g. 0.1) avoids it
    (docs/controller-behaviour.md).

    Args:
      labels: pytree of strings matching the params (or callable params -> such a tree):
        ``"{block}/{submodule}"`` is controlled; ``"*/{submodule}"`` marks a stacked leaf whose
        slice i along axis 0 is block i (scanned layers); anything else (e.g. ``"other"``)
        passes through.
      rho: EMA factor for a and c, in [0, 1).
      interval: K, measurement every K steps (static under ``optax.inject_hyperparams``).
      theta_neg: agreement below which a measurement counts towards probation, in [0, 1].
      patience: F, consecutive low measurements that put a block in probation (static).
      gamma: factor of a block in probation (0 freezes it), finite and >= 0.
      eps: added to c in v, finite and > 0.
      curvature_norm: ``"rms"`` (default) or ``"l2"``.
      debias: divide a and c by 1 - rho^n where used.
      update_norm_budget: lambda, or None for no clipping (see above for ``optax.masked``).
      submodules: explicit sub-module order (default: sorted names found in the labels).
      curvature_weighting: False makes v uniform 1/M (ablation).
      probation: False means no block ever enters probation (ablation).
      curvature_floor: option (not in the paper), in [0, 1]; c_{b,m} is raised to at least
        ``curvature_floor`` x the block's mean curvature before v is computed, so that a
        sub-module with zero (or tiny) gradient cannot take nearly all of its block's share.
        0 (default) is the reference rule.
      probation_share: ``"weights"`` (default, the reference rule: a block in probation gets
        gamma * fake_int8(L_active w_b v_{b,m} u), which is near 0 because w_b is) or
        ``"uniform"`` (option: it gets gamma * fake_int8(v_{b,m} u), gamma times the share it
        would have with all blocks active and uniform weights; this also keeps training when
        every block is in probation, L_active = 0).
      record_true_cosine: option (not in the paper), off by default: at each measurement also
        compute the cosine of the train and dev gradients themselves per block
        (``state.true_cosine``), to see what theta_neg on the sign-cosine means in true cosine.
        Needs the dev gradient itself (``dev_grad_fn``, or ``dev_grads`` as arrays), not its
        sign sketch; nothing in the update reads it.

    Numeric hyper-parameters (rho, theta_neg, gamma, eps, update_norm_budget, curvature_floor)
    may be jax scalars, as ``optax.inject_hyperparams`` passes them; they are checked only when
    they are Python or NumPy numbers.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`HACBOState`.
    """
    _groups.validate_rho(rho)
    _groups.validate_positive_int("interval", interval)
    _groups.validate_positive_int("patience", patience)
    _groups.validate_budget(update_norm_budget)
    _groups.validate_choice("curvature_norm", curvature_norm, ("rms", "l2"))
    _groups.validate_real("theta_neg", theta_neg, low=0.0, high=1.0, allowed="a number in [0, 1]")
    _groups.validate_real("gamma", gamma, low=0.0, allowed="a finite number >= 0")
    _groups.validate_real("eps", eps, low=0.0, low_open=True, allowed="a finite number > 0")
    _groups.validate_real(
        "curvature_floor", curvature_floor, low=0.0, high=1.0, allowed="a number in [0, 1]"
    )
    _groups.validate_choice("probation_share", probation_share, ("weights", "uniform"))
    for name, flag in [
        ("debias", debias),
        ("curvature_weighting", curvature_weighting),
        ("probation", probation),
        ("record_true_cosine", record_true_cosine),
    ]:
        _groups.validate_flag(name, flag)
    debias, curvature_weighting, probation = (
        bool(debias),
        bool(curvature_weighting),
        bool(probation),
    )
    shares_of = lambda state: hacbo_submodule_shares(
        state,
        eps=eps,
        rho=rho,
        debias=debias,
        curvature_weighting=curvature_weighting,
        interval=interval,
        curvature_floor=curvature_floor,
    )
    warned_first = []

    def init_fn(params):
        if _groups.is_params_placeholder(params):  # optax.tree_map_params: structure only
            num_b, num_m = 0, 0
        else:
            layout = _groups.resolve_layout(labels, params, submodules, allow_stacked=True)
            num_b, num_m = layout.num_blocks, layout.num_submodules
        return _completed(
            HACBOState(
                count=jnp.zeros([], jnp.int32),
                agreement=jnp.zeros([num_b], jnp.float32),
                curvature=jnp.zeros([num_b, num_m], jnp.float32),
                neg_count=jnp.zeros([num_b], jnp.int32),
                probation=jnp.zeros([num_b], bool),
                layer_weights=jnp.full([num_b], 1.0 / max(num_b, 1), jnp.float32),
                cosine=jnp.zeros([num_b], jnp.float32),
                true_cosine=jnp.zeros([num_b], jnp.float32) if record_true_cosine else None,
            )
        )

    def update_fn(
        updates,
        state,
        params=None,
        *,
        train_grads=None,
        dev_grads=None,
        dev_grad_fn=None,
        **extra_args,
    ):
        del extra_args
        _groups.check_training_inputs("hacbo", updates, train_grads, warned_first)
        layout = _groups.resolve_layout(labels, updates, submodules, allow_stacked=True)
        num_b, num_m = layout.num_blocks, layout.num_submodules
        _groups.check_state_shape("agreement", state.agreement, (num_b,))
        _groups.check_state_shape("curvature", state.curvature, (num_b, num_m))
        state = _completed(state)
        if record_true_cosine and state.true_cosine is None:  # a hand-written state
            state = state._replace(true_cosine=jnp.zeros([num_b], jnp.float32))
        update_leaves = _groups.flatten_like(layout, updates, "updates")
        train_leaves = _groups.flatten_like(layout, train_grads, "train_grads")
        sizes = _groups.check_groups_present(layout, train_leaves)

        def measure(state: HACBOState, dev_leaves) -> HACBOState:
            t = state.count + 1
            cos, sq_norms = _groups.sign_cosine_and_sq_norms(layout, train_leaves, dev_leaves)
            agreement = rho * state.agreement + (1.0 - rho) * jnp.maximum(cos, 0.0)
            norms = jnp.sqrt(sq_norms)
            if curvature_norm == "rms":
                norms = norms / jnp.sqrt(jnp.asarray(sizes, jnp.float32))
            curvature = rho * state.curvature + (1.0 - rho) * norms
            n_taken = _groups.measurements_taken(state, t, interval)
            used_agreement = agreement / _debias_divisor(n_taken, rho, debias)
            neg_count = jnp.where(used_agreement < theta_neg, state.neg_count + 1, 0)
            new_probation = state.probation
            if probation:
                new_probation = state.probation | (neg_count >= patience)
            total = jnp.sum(used_agreement)
            weights = jnp.where(
                total > 0, used_agreement / jnp.where(total > 0, total, 1.0), state.layer_weights
            )
            measured = state._replace(
                agreement=agreement.astype(jnp.float32),
                curvature=curvature.astype(jnp.float32),
                neg_count=neg_count.astype(jnp.int32),
                probation=new_probation,
                layer_weights=weights.astype(jnp.float32),
                cosine=cos,
            )
            if record_true_cosine:
                true_cos = _groups.true_cosine(layout, train_leaves, dev_leaves)
                measured = measured._replace(true_cosine=true_cos.astype(jnp.float32))
            return measured

        t, measured_now, measured = _groups.measure_if_due(
            state,
            interval,
            measure,
            dev_grads,
            dev_grad_fn,
            params,
            layout=layout,
            train_leaves=train_leaves,
        )
        measured = measured._replace(count=t)

        shares = shares_of(measured)
        multipliers = _multipliers_from_shares(measured, shares, probation_share)
        new_leaves = _groups.scale_updates(
            layout, update_leaves, multipliers, measured.probation if probation else None, gamma
        )

        # Probation exit is decided after this step's update (Algorithm 1, lines 35-39).
        mean_curvature = jnp.mean(measured.curvature, axis=1)  # common debias factor: irrelevant
        leaves_probation = (
            measured.probation
            & measured_now
            & ((measured.cosine > 0) | (mean_curvature < jnp.median(mean_curvature)))
        )
        new_leaves, budget_scale = _groups.clip_to_budget_with_scale(new_leaves, update_norm_budget)
        new_state = measured._replace(
            probation=measured.probation & ~leaves_probation,
            neg_count=jnp.where(leaves_probation, 0, measured.neg_count).astype(jnp.int32),
            multipliers=multipliers,
            budget_scale=budget_scale,
            min_submodule_share=jnp.min(shares, axis=1).astype(jnp.float32),
            probation_steps=(
                measured.probation_steps + (measured.probation if probation else False)
            ).astype(jnp.int32),
        )
        return layout.treedef.unflatten(new_leaves), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


FIRST_WARNING = _groups.FIRST_WARNING  # kept importable from here
