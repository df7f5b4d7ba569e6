"""BLAC: budgeted layer-wise agreement controller (the HACBO paper's baseline), as optax.

The paper describes BLAC only in prose; this follows the reconstruction fixed in
``shared/spec/controllers.md`` (section "BLAC").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hacbo_jax.controllers import _groups

PyTree = Any


class BLACState(NamedTuple):
    """State of :func:`blac`; float32 regardless of the params' dtype.

    Attributes:
      count: int32 scalar, number of ``update`` calls so far.
      agreement: a, f32[B], EMA of max(0, sign-cosine).
      signed_agreement: s, f32[B], EMA of the signed sign-cosine.
      frozen: f, bool[B], irreversible.
      layer_weights: w, f32[B], a / sum of a over non-frozen blocks (0 for frozen), init 1/B.
      cosine: f32[B], the sign-cosine of the last measurement.
    """

    count: jax.Array
    agreement: jax.Array
    signed_agreement: jax.Array
    frozen: jax.Array
    layer_weights: jax.Array
    cosine: jax.Array


def blac_multipliers(state: BLACState) -> jax.Array:
    """Per-block multipliers f32[B]: L_active * w_b for non-frozen blocks, 0 for frozen ones."""
    l_active = jnp.sum(~state.frozen).astype(jnp.float32)
    return jnp.where(state.frozen, 0.0, l_active * state.layer_weights).astype(jnp.float32)


def blac(
    labels: PyTree | Callable[[PyTree], PyTree],
    *,
    rho: float = 0.7436,
    interval: int = 20,
    freeze_after: int = 300,
    update_norm_budget: float | None = None,
    submodules: Sequence[str] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""BLAC: per-block agreement weighting with irreversible freezing.

    Same interface and placement as :func:`hacbo` (after the base optimiser; ``update`` takes
    ``train_grads`` and ``dev_grads`` or ``dev_grad_fn``). At step t, if t mod K = 0:

    - cos_b: sign-cosine of g_train and g_dev over block b (as HACBO step 1);
    - a_b <- rho a_b + (1 - rho) max(0, cos_b);  s_b <- rho s_b + (1 - rho) cos_b;
    - if t >= U (``freeze_after``) and s_b < 0: f_b <- True, never reset;
    - S = sum of a_j over non-frozen j; if S > 0, w_b = a_b / S for non-frozen b and 0 for
      frozen b, else w is kept.

    Every step, every controlled leaf of block b is multiplied by L_active w_b (0 if frozen),
    L_active = #non-frozen blocks; uncontrolled leaves pass unchanged. Last, with
    ``update_norm_budget`` = lambda, the whole update is clipped to global L2 norm lambda.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`BLACState`.
    """
    _groups.validate_rho(rho)
    _groups.validate_positive_int("interval", interval)
    _groups.validate_budget(update_norm_budget)
    if not isinstance(freeze_after, int) or freeze_after < 0:
        raise ValueError(f"freeze_after must be an integer >= 0, got {freeze_after!r}")

    def init_fn(params):
        num_b = _groups.resolve_layout(labels, params, submodules).num_blocks
        # One buffer per field: a train step that donates its state cannot take one buffer twice.
        return BLACState(
            count=jnp.zeros([], jnp.int32),
            agreement=jnp.zeros([num_b], jnp.float32),
            signed_agreement=jnp.zeros([num_b], jnp.float32),
            frozen=jnp.zeros([num_b], bool),
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
            raise ValueError("blac needs the raw training gradient: update(..., train_grads=grads)")
        layout = _groups.resolve_layout(labels, updates, submodules)
        _groups.check_state_shape("agreement", state.agreement, (layout.num_blocks,))
        update_leaves = _groups.flatten_like(layout, updates, "updates")
        train_leaves = _groups.flatten_like(layout, train_grads, "train_grads")

        def measure(state: BLACState, dev_source) -> BLACState:
            t = state.count + 1
            dev_leaves = _groups.flatten_like(layout, dev_source(), "dev gradient")
            cos, _ = _groups.sign_cosine_and_sq_norms(layout, train_leaves, dev_leaves)
            agreement = rho * state.agreement + (1.0 - rho) * jnp.maximum(cos, 0.0)
            signed = rho * state.signed_agreement + (1.0 - rho) * cos
            frozen = state.frozen | ((t >= freeze_after) & (signed < 0))
            active_agreement = jnp.where(frozen, 0.0, agreement)
            total = jnp.sum(active_agreement)
            weights = jnp.where(
                total > 0, active_agreement / jnp.where(total > 0, total, 1.0), state.layer_weights
            )
            return BLACState(
                state.count, agreement, signed, frozen, weights.astype(jnp.float32), cos
            )

        t, is_measurement, measured = _groups.measure_if_due(
            state, interval, measure, dev_grads, dev_grad_fn, params
        )
        measured = measured._replace(count=t)

        per_block = blac_multipliers(measured)
        multipliers = jnp.broadcast_to(
            per_block[:, None], (layout.num_blocks, layout.num_submodules)
        )
        new_leaves = _groups.scale_updates(layout, update_leaves, multipliers)
        new_leaves = _groups.clip_to_budget(new_leaves, update_norm_budget)
        return layout.treedef.unflatten(new_leaves), measured

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
