"""HACBO: hierarchical agreement-curvature budgeting, as an optax transformation.

Reference: "Elastic hierarchical agreement-curvature budgeting for trust-region controlled
fine-tuning" (HACBO), Algorithm 1, in the precise reading of ``shared/spec/controllers.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hacbo_jax.controllers import _groups

PyTree = Any


class HACBOState(NamedTuple):
    """State of :func:`hacbo`; float32 regardless of the params' dtype.

    Attributes:
      count: int32 scalar, number of ``update`` calls so far (t - 1 before call t).
      agreement: a, f32[B], EMA of max(0, sign-cosine) per block (raw, never debiased).
      curvature: c, f32[B, M], EMA of the training-gradient norm per (block, sub-module) (raw).
      neg_count: z, int32[B], consecutive measurements with a_b < theta_neg.
      probation: p, bool[B].
      layer_weights: w, f32[B], a / sum(a) at the last measurement with sum(a) > 0 (init 1/B).
      cosine: f32[B], the sign-cosine of the last measurement (init 0).
    """

    count: jax.Array
    agreement: jax.Array
    curvature: jax.Array
    neg_count: jax.Array
    probation: jax.Array
    layer_weights: jax.Array
    cosine: jax.Array


def _debias_divisor(count: jax.Array, rho: float, interval: int, debias: bool) -> jax.Array:
    """1 - rho^n with n = count // interval measurements so far; 1 when n = 0 or debias is off."""
    if not debias:
        return jnp.ones([], jnp.float32)
    n = (count // interval).astype(jnp.float32)
    return jnp.where(n > 0, 1.0 - jnp.float32(rho) ** n, 1.0)


def hacbo_multipliers(
    state: HACBOState,
    *,
    eps: float = 1e-8,
    rho: float = 0.8,
    debias: bool = False,
    curvature_weighting: bool = True,
    interval: int = 30,
) -> jax.Array:
    """Per-group update multipliers f32[B, M] of a HACBO state (spec steps 5-7).

    multiplier_{b,m} = L_active * w_b * v_{b,m}, with v_{b,m} = u_{b,m} / sum_m' u_{b,m'},
    u = 1 / (c + eps) (uniform 1/M if ``curvature_weighting`` is False) and
    L_active = #{b : not p_b}. Leaves of a block in probation additionally get
    gamma * fake_int8(.) in the update. ``rho``, ``debias`` and ``interval`` must match the
    transformation's: with ``debias``, c is divided by 1 - rho^n, n = count // interval.
    """
    curvature = state.curvature / _debias_divisor(state.count, rho, interval, debias)
    if curvature_weighting:
        inverse = 1.0 / (curvature + eps)
        within_block = inverse / jnp.sum(inverse, axis=1, keepdims=True)
    else:
        within_block = jnp.full_like(state.curvature, 1.0 / state.curvature.shape[1])
    l_active = jnp.sum(~state.probation).astype(jnp.float32)
    return (l_active * state.layer_weights[:, None] * within_block).astype(jnp.float32)


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
) -> optax.GradientTransformationExtraArgs:
    r"""HACBO: rescales each (block, sub-module) group of the base optimiser's update.

    Chain it *after* the base optimiser (``optax.chain(optax.adamw(lr), hacbo(labels))``): a
    per-group factor applied to the gradient before Adam is cancelled by Adam's per-coordinate
    normalisation. ``update`` takes two extra keyword arguments: ``train_grads`` (the raw
    training gradient) and the micro-dev gradient, either ``dev_grads`` or ``dev_grad_fn``
    (params -> grads, called only on measurement steps, inside ``lax.cond``).

    At step t (t = count + 1), if t mod K = 0 (K = ``interval``), a measurement:

    1. cos_b = <sign g_train(b), sign g_dev(b)> / (||sign g_train(b)|| ||sign g_dev(b)||)
       (0 if a norm is 0); a_b <- rho a_b + (1 - rho) max(0, cos_b).
    2. c_{b,m} <- rho c_{b,m} + (1 - rho) n_{b,m}, n = ||g_train(b,m)||_2 / sqrt(size) ("rms")
       or ||g_train(b,m)||_2 ("l2").
    3. z_b <- z_b + 1 if a_b < theta_neg else 0; p_b <- True if z_b >= F (F = ``patience``).
    4. If S = sum_j a_j > 0: w_b = a_b / S, else w is kept.

    Every step: multiplier_{b,m} = L_active w_b v_{b,m} (:func:`hacbo_multipliers`); a leaf of
    group (b, m) becomes multiplier * u, or gamma * fake_int8(multiplier * u) if p_b. Then, on
    measurement steps only, a block in probation leaves it (p_b <- False, z_b <- 0) if cos_b > 0
    or mean_m c_{b,m} < median_b' mean_m c_{b',m}; this affects the *next* step's update. Last,
    with ``update_norm_budget`` = lambda, the whole update is clipped to global L2 norm lambda.

    With ``debias=True``, wherever a and c are *used* (the theta_neg test, w, v and the
    probation-exit median test) they are divided by 1 - rho^n, n = t // K = number of
    measurements so far including this step's; the stored EMAs stay raw.

    Args:
      labels: pytree of strings matching the params (or callable params -> such a tree):
        ``"{block}/{submodule}"`` is controlled, anything else (e.g. ``"other"``) passes through.
      rho: EMA factor for a and c.
      interval: K, measurement every K steps.
      theta_neg: agreement below which a measurement counts towards probation.
      patience: F, consecutive low measurements that put a block in probation.
      gamma: factor of a block in probation (0 freezes it).
      eps: added to c in v.
      curvature_norm: ``"rms"`` (default) or ``"l2"``.
      debias: divide a and c by 1 - rho^n where used.
      update_norm_budget: lambda, or None for no clipping.
      submodules: explicit sub-module order (default: sorted names found in the labels).
      curvature_weighting: False makes v uniform 1/M (ablation).
      probation: False means no block ever enters probation (ablation).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`HACBOState`.
    """
    _groups.validate_rho(rho)
    _groups.validate_positive_int("interval", interval)
    _groups.validate_positive_int("patience", patience)
    _groups.validate_budget(update_norm_budget)
    if curvature_norm not in ("rms", "l2"):
        raise ValueError(f"curvature_norm must be 'rms' or 'l2', got {curvature_norm!r}")
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    multipliers_of = lambda state: hacbo_multipliers(
        state,
        eps=eps,
        rho=rho,
        debias=debias,
        curvature_weighting=curvature_weighting,
        interval=interval,
    )

    def init_fn(params):
        layout = _groups.resolve_layout(labels, params, submodules)
        num_b, num_m = layout.num_blocks, layout.num_submodules
        return HACBOState(
            count=jnp.zeros([], jnp.int32),
            agreement=jnp.zeros([num_b], jnp.float32),
            curvature=jnp.zeros([num_b, num_m], jnp.float32),
            neg_count=jnp.zeros([num_b], jnp.int32),
            probation=jnp.zeros([num_b], bool),
            layer_weights=jnp.full([num_b], 1.0 / num_b, jnp.float32),
            cosine=jnp.zeros([num_b], jnp.float32),
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
        if train_grads is None:
            raise ValueError(
                "hacbo needs the raw training gradient: update(..., train_grads=grads)"
            )
        layout = _groups.resolve_layout(labels, updates, submodules)
        num_b, num_m = layout.num_blocks, layout.num_submodules
        _groups.check_state_shape("agreement", state.agreement, (num_b,))
        _groups.check_state_shape("curvature", state.curvature, (num_b, num_m))
        update_leaves = _groups.flatten_like(layout, updates, "updates")
        train_leaves = _groups.flatten_like(layout, train_grads, "train_grads")
        sizes = _groups.check_groups_present(layout, train_leaves)

        def measure(state: HACBOState, dev_source) -> HACBOState:
            t = state.count + 1
            dev_leaves = _groups.flatten_like(layout, dev_source(), "dev gradient")
            cos, sq_norms = _groups.sign_cosine_and_sq_norms(layout, train_leaves, dev_leaves)
            agreement = rho * state.agreement + (1.0 - rho) * jnp.maximum(cos, 0.0)
            norms = jnp.sqrt(sq_norms)
            if curvature_norm == "rms":
                norms = norms / jnp.sqrt(jnp.asarray(sizes, jnp.float32))
            curvature = rho * state.curvature + (1.0 - rho) * norms
            used_agreement = agreement / _debias_divisor(t, rho, interval, debias)
            neg_count = jnp.where(used_agreement < theta_neg, state.neg_count + 1, 0)
            new_probation = state.probation
            if probation:
                new_probation = state.probation | (neg_count >= patience)
            total = jnp.sum(used_agreement)
            weights = jnp.where(
                total > 0, used_agreement / jnp.where(total > 0, total, 1.0), state.layer_weights
            )
            return HACBOState(
                state.count,
                agreement,
                curvature,
                neg_count.astype(jnp.int32),
                new_probation,
                weights.astype(jnp.float32),
                cos,
            )

        t, is_measurement, measured = _groups.measure_if_due(
            state, interval, measure, dev_grads, dev_grad_fn, params
        )
        measured = measured._replace(count=t)

        multipliers = multipliers_of(measured)
        new_leaves = _groups.scale_updates(
            layout, update_leaves, multipliers, measured.probation if probation else None, gamma
        )

        # Probation exit is decided after this step's update (Algorithm 1, lines 35-39).
        mean_curvature = jnp.mean(measured.curvature, axis=1)  # common debias factor: irrelevant
        leaves_probation = (
            measured.probation
            & is_measurement
            & ((measured.cosine > 0) | (mean_curvature < jnp.median(mean_curvature)))
        )
        new_state = measured._replace(
            probation=measured.probation & ~leaves_probation,
            neg_count=jnp.where(leaves_probation, 0, measured.neg_count).astype(jnp.int32),
        )

        new_leaves = _groups.clip_to_budget(new_leaves, update_norm_budget)
        return layout.treedef.unflatten(new_leaves), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
