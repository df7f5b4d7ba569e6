"""BLAC: budgeted layer-wise agreement controller (the HACBO paper's baseline), as optax.

The paper describes BLAC only in prose; this follows the reconstruction fixed in
``docs/algorithm.md`` (section "BLAC").
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
      count: int32 scalar, number of applied updates so far (a step that
        ``optax.apply_if_finite`` rejects leaves the state unchanged).
      agreement: a, f32[B], EMA of max(0, sign-cosine).
      signed_agreement: s, f32[B], EMA of the signed sign-cosine.
      frozen: f, bool[B], irreversible.
      layer_weights: w, f32[B]: 0 for frozen blocks; over the non-frozen blocks a / sum(a), or,
        when that sum is 0, the kept weights renormalised over them (uniform if those sum to 0),
        so they always sum to 1 over the non-frozen blocks (all 0 when every block is frozen).
        Init 1/B.
      cosine: f32[B], the sign-cosine of the last measurement taken.
      missed_measurements: int32 scalar, measurement steps reached without a dev gradient.
      skipped_measurements: int32 scalar, measurement steps skipped for a non-finite gradient.
      budget_scale: f32 scalar, the factor ``update_norm_budget`` applied at the last step.
      all_frozen_steps: int32 scalar, applied steps on which every block was frozen, so that
        no controlled parameter trained (the logs must say so).

    The last four fields default to None so that a state can be written by hand with the first
    six; ``update`` fills them in.
    """

    count: jax.Array
    agreement: jax.Array
    signed_agreement: jax.Array
    frozen: jax.Array
    layer_weights: jax.Array
    cosine: jax.Array
    missed_measurements: jax.Array | None = None
    skipped_measurements: jax.Array | None = None
    budget_scale: jax.Array | None = None
    all_frozen_steps: jax.Array | None = None


def _completed(state: BLACState) -> BLACState:
    """Fills the optional fields of a hand-written state."""
    defaults = {
        "missed_measurements": lambda: jnp.zeros([], jnp.int32),
        "skipped_measurements": lambda: jnp.zeros([], jnp.int32),
        "budget_scale": lambda: jnp.ones([], jnp.float32),
        "all_frozen_steps": lambda: jnp.zeros([], jnp.int32),
    }
    missing = {k: make() for k, make in defaults.items() if getattr(state, k) is None}
    return state._replace(**missing) if missing else state


def blac_multipliers(state: BLACState) -> jax.Array:
    """Per-block multipliers f32[B]: L_active * w_b for non-frozen blocks, 0 for frozen ones."""
    l_active = jnp.sum(~state.frozen).astype(jnp.float32)
    return jnp.where(state.frozen, 0.0, l_active * state.layer_weights).astype(jnp.float32)


def blac_idle_blocks(state: BLACState) -> jax.Array:
    """bool[B]: the blocks whose update the next BLAC step will set to exactly 0 whatever the
    gradient, as long as that step does not measure: the frozen ones (multiplier 0, and
    freezing is irreversible). A training step may skip their weight gradients. (A measurement
    step can freeze more blocks, but only after reading their gradients.)"""
    return jnp.asarray(state.frozen, bool)


def blac_weights(agreement: jax.Array, frozen: jax.Array, kept: jax.Array) -> jax.Array:
    """w over the non-frozen blocks (reference, BLAC): a / S with S = sum of their a if S > 0, else
    the ``kept`` weights renormalised over them (uniform over them if those sum to 0); 0 for
    frozen blocks (all 0 if every block is frozen)."""
    active_agreement = jnp.where(frozen, 0.0, agreement)
    total = jnp.sum(active_agreement)
    kept_active = jnp.where(frozen, 0.0, kept)
    kept_total = jnp.sum(kept_active)
    num_active = jnp.sum(~frozen).astype(jnp.float32)
    uniform = jnp.where(frozen, 0.0, 1.0 / jnp.maximum(num_active, 1.0))
    fallback = jnp.where(
        kept_total > 0, kept_active / jnp.where(kept_total > 0, kept_total, 1.0), uniform
    )
    return jnp.where(total > 0, active_agreement / jnp.where(total > 0, total, 1.0), fallback)


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
    ``train_grads`` and ``dev_grads`` or ``dev_grad_fn``; with neither, no measurement is traced
    and a measurement step reached that way is counted in ``missed_measurements``; a measurement
    with a non-finite gradient is skipped and counted in ``skipped_measurements``; meant to be
    jitted). At step t (applied steps), if t mod K = 0:

    - cos_b: sign-cosine of g_train and g_dev over block b (as HACBO step 1);
    - a_b <- rho a_b + (1 - rho) max(0, cos_b);  s_b <- rho s_b + (1 - rho) cos_b;
    - if t >= U (``freeze_after``) and s_b < 0: f_b <- True, never reset;
    - S = sum of a_j over non-frozen j; if S > 0, w_b = a_b / S for non-frozen b, else w is
      kept, renormalised over the non-frozen blocks (uniform over them if their kept weights sum
      to 0); w_b = 0 for frozen b (:func:`blac_weights`).

    Every step, every controlled leaf of block b is multiplied by L_active w_b (0 if frozen),
    L_active = #non-frozen blocks; uncontrolled leaves pass unchanged. When every block is
    frozen nothing controlled trains; ``all_frozen_steps`` counts those steps. Last, with
    ``update_norm_budget`` = lambda, the update this transformation sees is clipped to global L2
    norm lambda (inside ``optax.masked``, only the masked subset: use
    ``optax.clip_by_global_norm(lambda)`` last in the chain for the whole update).

    ``rho`` and ``update_norm_budget`` may be jax scalars (``optax.inject_hyperparams``; declare
    ``labels``, ``interval`` and ``freeze_after`` static).

    Args:
      labels: pytree of strings matching the params, or a callable params -> such a tree, as
        for :func:`hacbo`.
      rho: EMA factor of the agreement a and the signed agreement s, in (0, 1).
      interval: K, steps between measurements (static under ``optax.inject_hyperparams``).
      freeze_after: U, the step from which a block whose signed agreement s is negative is
        frozen for good (static).
      update_norm_budget: lambda, the cap on the update's global L2 norm; null for none.
      submodules: explicit sub-module order (default: sorted names found in the labels).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`BLACState`.
    """
    _groups.validate_rho(rho)
    _groups.validate_positive_int("interval", interval)
    _groups.validate_positive_int("freeze_after", freeze_after, minimum=0)
    _groups.validate_budget(update_norm_budget)
    warned_first = []

    def init_fn(params):
        if _groups.is_params_placeholder(params):  # optax.tree_map_params: structure only
            num_b = 0
        else:
            layout = _groups.resolve_layout(labels, params, submodules, allow_stacked=True)
            num_b = layout.num_blocks
        # One buffer per field: a train step that donates its state cannot take one buffer twice.
        return _completed(
            BLACState(
                count=jnp.zeros([], jnp.int32),
                agreement=jnp.zeros([num_b], jnp.float32),
                signed_agreement=jnp.zeros([num_b], jnp.float32),
                frozen=jnp.zeros([num_b], bool),
                layer_weights=jnp.full([num_b], 1.0 / max(num_b, 1), jnp.float32),
                cosine=jnp.zeros([num_b], jnp.float32),
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
        _groups.check_training_inputs("blac", updates, train_grads, warned_first)
        layout = _groups.resolve_layout(labels, updates, submodules, allow_stacked=True)
        _groups.check_state_shape("agreement", state.agreement, (layout.num_blocks,))
        state = _completed(state)
        update_leaves = _groups.flatten_like(layout, updates, "updates")
        train_leaves = _groups.flatten_like(layout, train_grads, "train_grads")

        def measure(state: BLACState, dev_leaves) -> BLACState:
            t = state.count + 1
            cos, _ = _groups.sign_cosine_and_sq_norms(layout, train_leaves, dev_leaves)
            agreement = rho * state.agreement + (1.0 - rho) * jnp.maximum(cos, 0.0)
            signed = rho * state.signed_agreement + (1.0 - rho) * cos
            frozen = state.frozen | ((t >= freeze_after) & (signed < 0))
            weights = blac_weights(agreement, frozen, state.layer_weights)
            return state._replace(
                agreement=agreement.astype(jnp.float32),
                signed_agreement=signed.astype(jnp.float32),
                frozen=frozen,
                layer_weights=weights.astype(jnp.float32),
                cosine=cos,
            )

        t, _, measured = _groups.measure_if_due(
            state,
            interval,
            measure,
            dev_grads,
            dev_grad_fn,
            params,
            layout=layout,
            train_leaves=train_leaves,
        )
        per_block = blac_multipliers(measured)
        multipliers = jnp.broadcast_to(
            per_block[:, None], (layout.num_blocks, layout.num_submodules)
        )
        new_leaves = _groups.scale_updates(layout, update_leaves, multipliers)
        new_leaves, budget_scale = _groups.clip_to_budget_with_scale(new_leaves, update_norm_budget)
        new_state = measured._replace(
            count=t,
            budget_scale=budget_scale,
            all_frozen_steps=measured.all_frozen_steps + jnp.all(measured.frozen).astype(jnp.int32),
        )
        return layout.treedef.unflatten(new_leaves), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
