"""The optimiser of a fine-tuning run and its one jitted training step.

The step is a pure function ``(TrainState, batch, dev_buffer) -> (TrainState, StepMetrics)``:
gradient accumulation over micro-batches (``lax.scan``), the base optimiser
(global-norm clip, AdamW with warm-up + cosine decay), the controller chained after it, and
``optax.apply_if_finite`` around the whole chain so that a non-finite loss or gradient leaves
params and optimiser state untouched. The micro-dev buffer lives on device; on measurement steps
only, a dev batch drawn from it is back-propagated, by default in a program of its own that
returns the gradient's signs (:func:`make_dev_signs_fn`, handed to the step as ``dev_grads``),
or inside the controller's ``lax.cond``. Nothing in the step talks to the host. A model whose
LoRA adapters have dropout gets a dropout key per step and micro-batch
(:func:`step_dropout_key`); the dev gradient and the evaluation loss are deterministic.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from hacbo_jax.trainer import sharding as sharding_lib
from hacbo_jax.controllers.compose import dev_sign_sketch, zero_blocks
from hacbo_jax.models.lora import set_dropout_key, uses_dropout
from hacbo_jax.trainer.controller_registry import find_controller_state
from hacbo_jax.trainer.recipes import QWEN3_RULES

# apply_if_finite lets a non-finite update through after this many consecutive rejections; the
# training loop stops the run long before (divergence.max_consecutive_nonfinite), so make it
# effectively "never".
_NEVER_APPLY_NONFINITE = 2**30


class Batch(NamedTuple):
    """Right-padded token batch (hacbo_jax.data.gsm8k.SFTArrays layout).

    Position t predicts ``targets[..., t]`` (= ``input_ids[..., t + 1]``); it counts in the loss
    where ``loss_mask[..., t] = 1``, i.e. where that target is an answer token.
    """

    input_ids: jax.Array  # int32 [..., L]
    attention_mask: jax.Array  # int32 [..., L]
    targets: jax.Array  # int32 [..., L]
    loss_mask: jax.Array  # float32 [..., L]


class PackedRows(NamedTuple):
    """Packed token rows (:mod:`hacbo_jax.data.packing`): several examples per row.

    ``segment_ids`` numbers the examples of a row 1, 2, ... (0 on padding) and ``positions``
    restart at 0 in every example, so the model's packed forward gives every token exactly the
    attention and RoPE positions it has in a padded :class:`Batch`; ``targets`` / ``loss_mask``
    are each example's own, laid out in the same slots. The loss (sum of NLL over answer tokens
    / answer tokens) is therefore the padded batch's.
    """

    input_ids: jax.Array  # int32 [..., L]
    segment_ids: jax.Array  # int32 [..., L]
    positions: jax.Array  # int32 [..., L]
    targets: jax.Array  # int32 [..., L]
    loss_mask: jax.Array  # float32 [..., L]


class WeightGradSkip(NamedTuple):
    """How a step skips the weight gradients of blocks whose update is known to be zero.

    ``idle_blocks(opt_state) -> bool[L]`` (traced before the backward pass;
    :func:`~hacbo_jax.trainer.controller_registry.controller_idle_blocks`) marks decoder layer
    i idle when the controller will set its whole update to exactly 0 this step. The step then
    (a) passes ``weight_grads = ~idle`` to the model, whose backward pass computes those layers'
    input gradients but not their projection kernel gradients (a ``lax.cond`` per layer: the
    selection is data, one compiled program), and (b) zeroes every leaf of the idle layers
    (``labels``: the controller's label tree; :func:`~hacbo_jax.controllers.compose.zero_blocks`),
    so norms and biases too. Everything after the gradient (clip norm, non-finite check,
    AdamW, the controller) sees that gradient. ``compute=False`` computes the dense gradient
    and only zeroes it: the exact reference the skipping step is tested against.

    By default only the step that does not measure skips (HACBO's measurement reads every
    block's gradient: a block leaves probation on its sign-cosine). ``when_measuring``: the
    measurement programs skip too, in the training and in the dev backward pass, for a
    controller whose measurement reads nothing of the idle blocks (BLAC: a frozen block's
    weight is 0 and it stays frozen, whatever its cosine).
    """

    idle_blocks: Callable[[Any], jax.Array]
    labels: Any
    compute: bool = True
    when_measuring: bool = False


def _skip_plan(skip: WeightGradSkip | None, measuring: bool, opt_state: Any):
    """(idle bool[L] or None, the model's ``weight_grads`` or None) of one backward pass."""
    if skip is None or (measuring and not skip.when_measuring):
        return None, None
    idle = skip.idle_blocks(opt_state)
    return idle, (~idle if skip.compute else None)


# fold_in tag of the dropout key ("drop"): far from the small counters jax.random.split and the
# dev batch's jax.random.choice derive from the same key (split(k)[i] is fold_in(k, i) under
# JAX's partitionable threefry), so the masks are independent of the dev batch draw.
_DROPOUT_TAG = 0x64726F70


def step_dropout_key(dev_key: jax.Array) -> jax.Array:
    """The step's LoRA dropout key, ``fold_in(dev_key, "drop")``, with ``dev_key`` the second
    half of ``jax.random.split(state.rng)``.

    Derived by fold_in rather than a third split so that the split sequence of the run's
    PRNG state (and so every dev batch and every result without dropout) is unchanged; it
    follows ``state.rng``, so a resumed run draws the masks the uninterrupted run drew.
    Micro-batch j then uses ``fold_in(key, j)`` (:func:`_mean_gradient`) and each adapter
    ``fold_in(fold_in(., layer), module)`` (:func:`~hacbo_jax.models.lora.set_dropout_key`).
    """
    return jax.random.fold_in(dev_key, _DROPOUT_TAG)


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimiser steps taken (including skipped ones)
    params: Any  # pure dict of arrays (nnx.to_pure_dict of the model's nnx.Param state)
    opt_state: Any
    rng: jax.Array  # PRNG key, split once per step


class StepShardings(NamedTuple):
    """Where the step's inputs and outputs live on a device mesh (``hacbo_jax.trainer.sharding``).

    ``jax.jit`` gets ``state`` / ``batch`` / ``dev_buffer`` as in- and out-shardings and XLA
    inserts the collectives; inside the step the accumulated gradient is constrained to the
    params' shardings (FSDP: reduce-scattered, not all-reduced) and the sampled dev batch to
    ``dev_batch`` (its examples split over the devices like a training micro-batch).
    """

    state: Any  # TrainState of NamedSharding
    batch: Any  # NamedSharding of the [accum, micro, L] batch arrays
    dev_buffer: Any  # NamedSharding of the [N_dev, L] micro-dev buffer (replicated)
    dev_batch: Any | None  # NamedSharding of the [1, dev_batch, L] dev batch, or None
    metrics: Any  # NamedSharding of the scalar metrics (replicated)
    frozen: Any = None  # NamedSharding tree of the frozen state (LoRA's base), or None


class StepMetrics(NamedTuple):
    loss: jax.Array  # mean next-token NLL over answer tokens of the global batch
    target_tokens: jax.Array  # number of answer tokens in the global batch
    grad_norm: jax.Array  # global L2 norm of the raw (unclipped) training gradient
    update_norm: jax.Array  # global L2 norm of the applied update
    learning_rate: jax.Array
    finite: jax.Array  # bool: the step was applied
    consecutive_nonfinite: jax.Array  # int32
    total_nonfinite: jax.Array  # int32
    # int32: the controller's count after the step (applied steps; 0 without a controller). With
    # consecutive_nonfinite it is what the loop reads every step (one small device->host read):
    # the next step measures iff (controller_count + 1) % K == 0.
    controller_count: jax.Array


def learning_rate_schedule(peak_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak_lr``, then cosine decay to zero at ``total_steps``."""
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} must be >= 0 and < total_steps={total_steps}"
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=0.0,
    )


def build_optimizer(
    *,
    schedule: optax.Schedule,
    b1: float,
    b2: float,
    weight_decay: float,
    clip_norm: float | None,
    controller: optax.GradientTransformationExtraArgs | Callable[..., Any] | None,
    inject_lr: bool = False,
    peak_lr: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """``apply_if_finite(chain(clip, adamw, controller))``, or with a wrapping controller
    ``apply_if_finite(chain(clip, controller(adamw)))``.

    A controller transformation (HACBO, BLAC) comes after AdamW: it rescales AdamW's update per
    (block, sub-module). Put before AdamW, a per-group gradient factor would be cancelled by
    Adam's m / sqrt(v). A controller given as a function (AdaGradSelect: ``inner ->
    transformation``) wraps AdamW, so that it can keep the moments of the blocks that sit out.

    ``inject_lr``: AdamW through ``optax.inject_hyperparams`` with the constant rate
    ``schedule(0)``, so that a driver (AutoLRS, :func:`hacbo_jax.experiments.autolrs.algorithm.set_learning_rate`)
    changes the learning rate in the state without recompiling.

    ``peak_lr``: AdamW's rate is ``peak_lr * schedule(count)``, ``schedule`` a unit schedule
    (peak 1), with ``peak_lr`` an ``optax.inject_hyperparams`` value in the state
    (``peak_learning_rate``) instead of a constant of the compiled update. Runs that differ only
    in their rate then compile the same program, so the cells of a learning-rate grid share
    JAX's persistent compilation cache instead of compiling again each (about 30 s a run on
    this CPU). :func:`applied_learning_rate` reads it back.
    """
    if inject_lr and peak_lr is not None:
        raise ValueError("inject_lr and peak_lr exclude each other: one learning rate in the state")
    parts = []
    if clip_norm is not None:
        parts.append(optax.clip_by_global_norm(clip_norm))
    if inject_lr:
        adamw = optax.inject_hyperparams(optax.adamw, static_args=("b1", "b2", "weight_decay"))(
            learning_rate=float(schedule(0)), b1=b1, b2=b2, weight_decay=weight_decay
        )
    elif peak_lr is not None:
        scaled_adamw = lambda peak_learning_rate, b1, b2, weight_decay: optax.adamw(  # noqa: E731
            lambda count: peak_learning_rate * schedule(count),
            b1=b1,
            b2=b2,
            weight_decay=weight_decay,
        )
        adamw = optax.inject_hyperparams(scaled_adamw, static_args=("b1", "b2", "weight_decay"))(
            peak_learning_rate=peak_lr, b1=b1, b2=b2, weight_decay=weight_decay
        )
    else:
        adamw = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay)
    if controller is None or isinstance(controller, optax.GradientTransformation):
        parts.append(adamw)
        if controller is not None:
            parts.append(controller)
    else:
        parts.append(controller(adamw))
    return optax.apply_if_finite(optax.chain(*parts), _NEVER_APPLY_NONFINITE)


def guard_nonfinite_result(
    old_params: Any, old_state: Any, updates: Any, new_params: Any, new_state: Any
) -> tuple[Any, Any]:
    """Skips a step whose *result* is non-finite, as ``apply_if_finite`` skips a NaN gradient.

    ``optax.apply_if_finite`` only looks at the incoming gradient; a finite gradient can still
    give a non-finite update (lr = inf: ``inf * 0``; a controller's update-norm budget whose norm
    overflows) and so non-finite params. When any leaf of ``updates`` or ``new_params`` is not
    finite, this returns the old params and the old inner optimiser state, with the
    :class:`optax.ApplyIfFiniteState` counters advanced exactly as for a skipped gradient
    (``notfinite_count + 1``, ``last_finite = False``, ``total_notfinite + 1``). When the
    gradient itself was non-finite ``apply_if_finite`` already skipped it (its zero update and
    unchanged params are finite), so a step is never counted twice.
    """
    leaves = jax.tree.leaves((updates, new_params))
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
    skipped = optax.ApplyIfFiniteState(
        notfinite_count=old_state.notfinite_count + 1,
        last_finite=jnp.array(False),
        total_notfinite=old_state.total_notfinite + 1,
        inner_state=old_state.inner_state,
    )
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    return pick(new_params, old_params), pick(new_state, skipped)


def applied_learning_rate(opt_state: Any, schedule: optax.Schedule) -> jax.Array:
    """The learning rate AdamW used for this step: the injected ``learning_rate`` of an
    ``inject_hyperparams`` AdamW (``inject_lr``, set by a driver), else the schedule at AdamW's
    own count (:func:`schedule_count`), times the state's ``peak_learning_rate`` when it holds
    one (``build_optimizer(peak_lr=...)``: ``schedule`` is then the unit schedule)."""
    injected = optax.tree_utils.tree_get(opt_state, "learning_rate")
    if injected is not None:
        return jnp.asarray(injected, jnp.float32)
    rate = schedule(schedule_count(opt_state))
    peak = optax.tree_utils.tree_get(opt_state, "peak_learning_rate")
    return rate if peak is None else peak * rate


def schedule_count(opt_state: Any) -> jax.Array:
    """The step count the learning-rate schedule is evaluated at: AdamW's own
    ``ScaleByScheduleState.count``, which (unlike ``TrainState.step``) does not advance on
    skipped steps. The first such count in the tree is the base optimiser's (the controller
    comes after it in the chain)."""
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    for path, value in found:
        if any(getattr(k, "tuple_name", None) == "ScaleByScheduleState" for k in path):
            return value
    raise ValueError("the optimiser state holds no ScaleByScheduleState (not build_optimizer's)")


def answer_nll(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Summed next-token NLL over answer tokens (fp32), and the number of those tokens."""
    weights = batch.loss_mask.astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch.targets)
    return jnp.sum(nll * weights), jnp.sum(weights)


def chunked_answer_nll(
    lm_logits: Callable[[jax.Array], jax.Array], hidden: jax.Array, batch: Batch, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """:func:`answer_nll` computed ``chunk`` positions at a time.

    The [B, T, V] logits never exist at once: each chunk's logits are recomputed in the backward
    pass (``jax.checkpoint``), so the loss holds [B, chunk, V]. With Qwen3's 151,936-token
    vocabulary this is the largest activation of a fine-tuning step. T is padded (weight 0) up
    to a multiple of ``chunk``.
    """
    t = hidden.shape[1]
    n = -(-t // chunk)
    pad = n * chunk - t
    weights = batch.loss_mask.astype(jnp.float32)
    targets = batch.targets
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))

    def split(x):  # [B, n * chunk, ...] -> [n, B, chunk, ...]
        return jnp.moveaxis(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def add_chunk(total, piece):
        h, y, w = piece
        nll = optax.softmax_cross_entropy_with_integer_labels(lm_logits(h), y)
        return total + jnp.sum(nll * w), None

    total, _ = jax.lax.scan(
        add_chunk, jnp.zeros([], jnp.float32), (split(hidden), split(targets), split(weights))
    )
    return total, jnp.sum(weights)


def hidden_states(
    model: Any, batch: Batch | PackedRows, weight_grads: jax.Array | None = None
) -> jax.Array:
    """The model's final hidden states for a padded :class:`Batch` or :class:`PackedRows`
    (block-diagonal causal mask and per-segment positions: the model's packed forward).
    ``weight_grads`` (bool[L] or None) is passed on only when set."""
    kwargs = {} if weight_grads is None else {"weight_grads": weight_grads}
    if isinstance(batch, PackedRows):
        return model.hidden_states(
            batch.input_ids, segment_ids=batch.segment_ids, positions=batch.positions, **kwargs
        )
    return model.hidden_states(batch.input_ids, batch.attention_mask, **kwargs)


def make_loss_fn(
    graphdef: nnx.GraphDef, rest: nnx.State, *, logits_chunk: int | None = None
) -> Callable[[Any, Batch | PackedRows], tuple]:
    """``loss_fn(params, batch) -> (summed answer NLL, answer-token count)``.

    ``batch`` is a padded :class:`Batch` or :class:`PackedRows` (the pytree type is static
    under ``jit``, so one step function serves packed training batches and padded dev batches).
    ``logits_chunk``: compute the vocabulary projection and cross-entropy that many positions
    at a time (:func:`chunked_answer_nll`); None computes the full logits at once.
    ``weight_grads`` (optional third argument, bool[L]): see :class:`WeightGradSkip`.
    ``dropout_key`` (keyword): the key of the LoRA adapters' dropout masks
    (:func:`~hacbo_jax.models.lora.set_dropout_key`); None, the default, is deterministic (the
    evaluation loss and the dev gradients never pass one). Ignored by a model without dropout.
    ``frozen`` (keyword): the model's other state in place of ``rest``. A jitted caller passes
    the frozen part this way, as an argument of its program: closed over, ``rest`` would be a
    constant of the compiled program (for LoRA that is the whole base model, copied into every
    program that uses it).
    """

    def loss_fn(
        params: Any,
        batch: Batch | PackedRows,
        weight_grads: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
        frozen: nnx.State | None = None,
    ):
        model = nnx.merge(graphdef, nnx.State(params), rest if frozen is None else frozen)
        if dropout_key is not None:
            set_dropout_key(model, dropout_key)  # a no-op without adapter dropout
        hidden = hidden_states(model, batch, weight_grads)
        if logits_chunk is None:
            return answer_nll(model.lm_logits(hidden), batch)
        return chunked_answer_nll(model.lm_logits, hidden, batch, logits_chunk)

    return loss_fn


def _mean_gradient(
    loss_fn,
    params,
    micro_batches: Batch,
    constrain=lambda grads: grads,
    weight_grads=None,
    dropout_key=None,
):
    """Gradient of (sum of NLL) / (answer tokens) over all micro-batches, accumulated by scan.

    ``constrain`` pins the accumulator's layout (on a mesh: the params' shardings);
    ``weight_grads`` (bool[L] or None) is the model's (:class:`WeightGradSkip`);
    ``dropout_key`` (or None: no dropout) gives micro-batch j the key ``fold_in(dropout_key,
    j)``, so every micro-batch of a step draws its own masks.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    extra = () if weight_grads is None else (weight_grads,)

    def accumulate(carry, micro):
        nll_sum, count, grads = carry
        if dropout_key is None:
            (nll, n), g = grad_fn(params, micro, *extra)
        else:
            micro, j = micro
            key = jax.random.fold_in(dropout_key, j)
            (nll, n), g = grad_fn(params, micro, *extra, dropout_key=key)
        grads = constrain(jax.tree.map(jnp.add, grads, g))
        return (nll_sum + nll, count + n, grads), None

    zeros = constrain(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
    xs = micro_batches
    if dropout_key is not None:  # the micro-batch index rides along (no change without dropout)
        xs = (micro_batches, jnp.arange(jax.tree.leaves(micro_batches)[0].shape[0]))
    (nll_sum, count, grads), _ = jax.lax.scan(
        accumulate, (jnp.float32(0), jnp.float32(0), zeros), xs
    )
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    return nll_sum / denom, count, grads


def make_train_step(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    tx: optax.GradientTransformationExtraArgs,
    schedule: optax.Schedule,
    *,
    dev_batch_size: int,
    uses_dev_grads: bool,
    donate: bool = True,
    shardings: StepShardings | None = None,
    logits_chunk: int | None = None,
    dev_signs_argument: bool = False,
    controlled: Any = None,
    skip: WeightGradSkip | None = None,
) -> Callable[..., tuple[TrainState, StepMetrics]]:
    """The jitted step.

    ``uses_dev_grads``: the controller gets a ``dev_grad_fn`` (a dev batch drawn from the buffer
    and back-propagated inside the controller's ``lax.cond``, on its measurement steps); False:
    no dev gradient is traced (a controller that reaches a measurement step counts it as
    missed). :func:`make_train_steps` compiles both and lets the loop pick.
    ``dev_signs_argument`` (with ``uses_dev_grads``): the step takes a fourth argument, the dev
    gradient's :func:`~hacbo_jax.controllers.compose.dev_sign_sketch` from
    :func:`make_dev_signs_fn`, and gives it to the controller as ``dev_grads`` (no dev backward
    in this program); ``controlled``: the mask that program was made with (its empty sketches
    are placed replicated on a mesh). ``skip``: skip the weight gradients of the blocks the
    controller will not update (:class:`WeightGradSkip`; in a step with ``uses_dev_grads``
    only if ``skip.when_measuring``).

    ``batch`` arrays have shape [accum, micro_batch, L] (a padded :class:`Batch`, or
    :class:`PackedRows` with [accum, rows, L]: ``data.packing``); ``dev_buffer`` arrays
    [N_dev, L] hold the whole micro-dev buffer on device (always padded). ``shardings`` places
    the step on a device mesh
    (None: JAX's default single-device placement, no constraints).
    """
    loss_of_frozen = make_loss_fn(graphdef, rest, logits_chunk=logits_chunk)
    takes_dev_signs = uses_dev_grads and dev_signs_argument

    def step_fn(
        frozen: nnx.State, state: TrainState, batch: Batch, dev_buffer: Batch, dev_signs=None
    ):
        loss_fn = functools.partial(loss_of_frozen, frozen=frozen)
        constrain_grads, dev_grad = _dev_gradient(loss_fn, dev_batch_size, shardings)
        rng, dev_key = jax.random.split(state.rng)
        idle, weight_grads = _skip_plan(skip, uses_dev_grads, state.opt_state)
        # Only a model with dropout gets a key: without, the program is the one it always was.
        dropout_key = (
            step_dropout_key(dev_key)
            if uses_dropout(nnx.merge(graphdef, nnx.State(state.params), frozen))
            else None
        )
        loss, count, grads = _mean_gradient(
            loss_fn, state.params, batch, constrain_grads, weight_grads, dropout_key
        )
        if idle is not None:
            grads = constrain_grads(zero_blocks(skip.labels, grads, idle))
        # A non-finite loss must skip the step even if its gradient happens to be finite.
        grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)

        extra = {"train_grads": grads}
        if takes_dev_signs:
            extra["dev_grads"] = dev_signs
        elif uses_dev_grads:
            extra["dev_grad_fn"] = lambda params: dev_grad(params, dev_key, dev_buffer, skip, idle)

        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        params, opt_state = guard_nonfinite_result(
            state.params, state.opt_state, updates, params, opt_state
        )
        finite_state = opt_state  # ApplyIfFiniteState is the outermost state
        metrics = StepMetrics(
            loss=loss,
            target_tokens=count,
            grad_norm=optax.tree.norm(grads),
            update_norm=optax.tree.norm(updates),
            learning_rate=applied_learning_rate(state.opt_state, schedule),
            finite=finite_state.last_finite,
            consecutive_nonfinite=finite_state.notfinite_count,
            total_nonfinite=finite_state.total_notfinite,
            controller_count=_controller_count(opt_state),
        )
        return TrainState(state.step + 1, params, opt_state, rng), metrics

    donate_argnums = (1,) if donate else ()  # the state; never the frozen base (argument 0)
    if shardings is None:
        return WithFrozen(jax.jit(step_fn, donate_argnums=donate_argnums), rest)
    in_shardings = (
        frozen_shardings(shardings, rest),
        shardings.state,
        shardings.batch,
        shardings.dev_buffer,
    )
    if takes_dev_signs:
        in_shardings += (sketch_shardings(shardings.state.params, controlled),)
    jitted = jax.jit(
        step_fn,
        donate_argnums=donate_argnums,
        in_shardings=in_shardings,
        out_shardings=(shardings.state, shardings.metrics),
    )
    return WithFrozen(jitted, rest)


class WithFrozen:
    """``fn(*args)`` = ``jitted(frozen, *args)``: a jitted program whose first argument, the
    model's frozen state (``rest`` of the split: LoRA's base model, empty in full
    fine-tuning), is bound here.

    Closed over, those arrays would be constants of the compiled program: the whole base copied
    into every program (on Qwen3-0.6B 1.2 GB of bf16 per program), and not placed by the mesh's
    shardings. As an argument it is the same device buffer for every call and every program.
    ``lower(*args)`` lowers with the bound state, like ``jax.jit``'s.
    """

    def __init__(self, jitted: Callable[..., Any], frozen: nnx.State):
        self.jitted = jitted
        self.frozen = frozen

    def __call__(self, *args: Any) -> Any:
        return self.jitted(self.frozen, *args)

    def lower(self, *args: Any) -> Any:
        return self.jitted.lower(self.frozen, *args)


def frozen_shardings(shardings: StepShardings, rest: nnx.State) -> Any:
    """Where the frozen state lives on the mesh: ``shardings.frozen``, or replicated when the
    step shardings were made without it (full fine-tuning: nothing is frozen)."""
    if shardings.frozen is not None:
        return shardings.frozen
    return jax.tree.map(lambda _: shardings.metrics, rest)


def _dev_gradient(
    loss_fn,
    dev_batch_size: int,
    shardings: StepShardings | None,
    controlled: Any = None,
):
    """(constrain_grads, dev_grad): ``dev_grad(params, dev_key, dev_buffer, skip=None,
    idle=None)`` draws ``dev_batch_size`` distinct examples of the buffer with ``dev_key`` and
    returns their mean gradient (on a mesh: the batch and the gradient constrained like the
    training ones); with ``idle`` (bool[L]) the idle blocks' weight gradients are skipped and
    their leaves zeroed as in the training step (:class:`WeightGradSkip`).

    With ``controlled`` (a bool tree like the params), only the leaves marked True are
    differentiated; the others are constants of the loss and are None in the returned gradient.
    """
    param_shardings = None if shardings is None else shardings.state.params
    if controlled is not None and param_shardings is not None:
        param_shardings = _controlled_part(param_shardings, controlled)
    if shardings is None:
        constrain_grads = constrain_dev = lambda tree: tree
    else:
        constrain_grads = lambda grads: jax.lax.with_sharding_constraint(grads, param_shardings)
        constrain_dev = (
            (lambda dev: dev)
            if shardings.dev_batch is None
            else (lambda dev: jax.lax.with_sharding_constraint(dev, shardings.dev_batch))
        )

    def dev_grad(params, dev_key, dev_buffer, skip=None, idle=None):
        n_dev = dev_buffer.input_ids.shape[0]
        idx = jax.random.choice(dev_key, n_dev, (dev_batch_size,), replace=False)
        dev = constrain_dev(jax.tree.map(lambda x: x[idx][None], dev_buffer))
        weight_grads = None if idle is None or not skip.compute else ~idle
        if controlled is None:
            grads = _mean_gradient(loss_fn, params, dev, constrain_grads, weight_grads)[2]
        else:
            loss_of_part, part = restrict_to_controlled(loss_fn, params, controlled)
            grads = _mean_gradient(loss_of_part, part, dev, constrain_grads, weight_grads)[2]
        return grads if idle is None else constrain_grads(zero_blocks(skip.labels, grads, idle))

    return constrain_grads, dev_grad


def _controlled_part(tree: Any, controlled: Any) -> Any:
    """``tree`` with None at the leaves ``controlled`` marks False (JAX skips None subtrees)."""
    return jax.tree.map(lambda x, keep: x if keep else None, tree, controlled)


def restrict_to_controlled(
    fn: Callable[..., Any], params: Any, controlled: Any
) -> tuple[Callable[..., Any], Any]:
    """``(fn_of_part, part)``: ``part`` is ``params`` with None at the leaves ``controlled``
    marks False, and ``fn_of_part(part, *args) = fn(params with part's leaves, *args)``. The
    other leaves are constants of ``fn_of_part``, so ``jax.grad(fn_of_part)(part, ...)`` computes
    no gradient for them (a tree with None there, as
    :func:`~hacbo_jax.controllers.compose.dev_sign_sketch` with ``controlled`` takes it)."""

    def fn_of_part(part: Any, *args: Any) -> Any:
        merged = jax.tree.map(lambda keep, p, q: q if keep else p, controlled, params, part)
        return fn(merged, *args)

    return fn_of_part, _controlled_part(params, controlled)


def make_dev_signs_fn(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    *,
    dev_batch_size: int,
    shardings: StepShardings | None = None,
    logits_chunk: int | None = None,
    controlled: Any = None,
    skip: WeightGradSkip | None = None,
) -> Callable[[TrainState, Batch], Any]:
    """The jitted ``(state, dev_buffer) -> dev_sign_sketch(dev gradient)`` of the next step.

    It draws the same dev batch as the step's own ``dev_grad_fn`` would (the key of
    ``jax.random.split(state.rng)``) and back-propagates it at ``state.params``. As a program of
    its own it never holds the training gradient, and the measurement step that receives its
    output holds two bits per coordinate instead of a second fp32 gradient (on
    Qwen3-0.6B the measurement step's peak comes down to the ordinary step's plus the sketch).

    ``controlled`` (:func:`~hacbo_jax.controllers.compose.controlled_leaves` of the controller's
    labels): back-propagate to the controlled leaves only; the others' sketches are empty. The
    controllers read nothing else, so the measurement is the same, and no gradient of the
    embeddings is computed: with tied embeddings that is the vocabulary projection's weight
    gradient (on Qwen3-0.6B a 0.58 GiB fp32 leaf and a third of the head's backward FLOPs).
    ``skip`` with ``when_measuring``: the idle blocks' weight gradients are skipped too
    (:class:`WeightGradSkip`).
    """
    loss_of_frozen = make_loss_fn(graphdef, rest, logits_chunk=logits_chunk)

    def dev_signs_fn(frozen: nnx.State, state: TrainState, dev_buffer: Batch):
        loss_fn = functools.partial(loss_of_frozen, frozen=frozen)
        _, dev_grad = _dev_gradient(loss_fn, dev_batch_size, shardings, controlled)
        _, dev_key = jax.random.split(state.rng)
        idle, _ = _skip_plan(skip, True, state.opt_state)
        grads = dev_grad(state.params, dev_key, dev_buffer, skip, idle)
        return dev_sign_sketch(grads, controlled)

    if shardings is None:
        return WithFrozen(jax.jit(dev_signs_fn), rest)
    jitted = jax.jit(
        dev_signs_fn,
        in_shardings=(frozen_shardings(shardings, rest), shardings.state, shardings.dev_buffer),
        out_shardings=sketch_shardings(shardings.state.params, controlled),
    )
    return WithFrozen(jitted, rest)


def sketch_shardings(param_shardings: Any, controlled: Any = None) -> Any:
    """Shardings of :func:`~hacbo_jax.controllers.compose.dev_sign_sketch`'s uint8 [rows, bytes]
    leaves: each parameter's leading-axis sharding on the rows (a stacked leaf's block axis),
    the packed bytes replicated. (A parameter sharded on a later axis gets a replicated sketch:
    a sixteenth of its fp32 size on every device.) With ``controlled``, the empty sketches of
    the uncontrolled leaves are replicated."""

    def one(sharding: NamedSharding, keep: bool = True) -> NamedSharding:
        lead = sharding.spec[0] if len(sharding.spec) and keep else None
        return NamedSharding(sharding.mesh, PartitionSpec(lead, None))

    if controlled is None:
        return jax.tree.map(one, param_shardings)
    return jax.tree.map(one, param_shardings, controlled)


def _controller_count(opt_state: Any) -> jax.Array:
    found = find_controller_state(opt_state)
    count = jnp.zeros([], jnp.int32) if found is None else found.count
    return jnp.asarray(count, jnp.int32)


class TrainSteps(NamedTuple):
    """The two compiled steps of a run whose controller measures (:func:`make_train_steps`).

    ``ordinary`` traces no dev gradient at all (no dev batch, no second backward: it reserves
    none of the measurement's memory); ``measurement`` draws a dev batch and back-propagates it.
    The loop calls ``measurement`` when the controller's next step t = count + 1 is a multiple
    of ``interval`` (:meth:`pick`), with ``count`` read from the previous step's
    :attr:`StepMetrics.controller_count` (applied steps: a skipped step does not advance it).
    Without a measuring controller both are the same function and ``interval`` is None.
    """

    ordinary: Callable[[TrainState, Batch, Batch], tuple[TrainState, StepMetrics]]
    measurement: Callable[[TrainState, Batch, Batch], tuple[TrainState, StepMetrics]]
    interval: int | None

    def measures_next(self, controller_count: int) -> bool:
        """Whether the step after a controller count of ``controller_count`` measures."""
        return self.interval is not None and (int(controller_count) + 1) % self.interval == 0

    def pick(self, controller_count: int):
        """The step function to call after a controller count of ``controller_count``."""
        return self.measurement if self.measures_next(controller_count) else self.ordinary


def make_train_steps(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    tx: optax.GradientTransformationExtraArgs,
    schedule: optax.Schedule,
    *,
    interval: int | None,
    dev_batch_size: int,
    donate: bool = True,
    shardings: StepShardings | None = None,
    logits_chunk: int | None = None,
    separate_dev_pass: bool = True,
    controlled: Any = None,
    skip: WeightGradSkip | None = None,
) -> TrainSteps:
    """:class:`TrainSteps` of a run: ``interval`` = the measuring controller's K, or None (no
    controller, or one that takes no dev gradient: one compiled step serves as both).

    ``separate_dev_pass`` (default): the measurement is two programs, :func:`make_dev_signs_fn`
    and then the step with the signs as its fourth argument, so a full fp32 dev gradient and the
    training gradient never coexist. False: one program, the dev gradient inside the
    controller's ``lax.cond`` (the same numbers; a higher peak). ``controlled`` (a bool tree
    like the params, :func:`~hacbo_jax.controllers.compose.controlled_leaves`): the separate
    dev program back-propagates to the controlled leaves only (the same measurement, less work).
    ``skip`` (:class:`WeightGradSkip`): the step that does not measure (``ordinary``; for a
    controller without measurements the only one) skips idle blocks' weight gradients, and
    with ``skip.when_measuring`` the measurement's two programs too.
    """
    make = lambda uses_dev_grads, dev_signs_argument=False, skip=None: make_train_step(
        graphdef,
        rest,
        tx,
        schedule,
        dev_batch_size=dev_batch_size,
        uses_dev_grads=uses_dev_grads,
        donate=donate,
        shardings=shardings,
        logits_chunk=logits_chunk,
        dev_signs_argument=dev_signs_argument,
        controlled=controlled,
        skip=skip,
    )
    ordinary = make(False, skip=skip)
    if interval is None:
        return TrainSteps(ordinary, ordinary, None)
    measuring_skip = skip if skip is not None and skip.when_measuring else None
    if not separate_dev_pass:
        return TrainSteps(ordinary, make(True, skip=measuring_skip), int(interval))
    dev_signs_fn = make_dev_signs_fn(
        graphdef,
        rest,
        dev_batch_size=dev_batch_size,
        shardings=shardings,
        logits_chunk=logits_chunk,
        controlled=controlled,
        skip=measuring_skip,
    )
    measuring_step = make(True, dev_signs_argument=True, skip=measuring_skip)

    def measurement(state: TrainState, batch: Batch, dev_buffer: Batch):
        # the signs first: this program's dev gradient is gone before the step's gradient exists
        return measuring_step(state, batch, dev_buffer, dev_signs_fn(state, dev_buffer))

    return TrainSteps(ordinary, measurement, int(interval))


def step_shardings(
    mesh: jax.sharding.Mesh,
    state: TrainState,
    *,
    rules: Sequence[sharding_lib.PartitionRule] = QWEN3_RULES,
    dev_batch_size: int,
    min_elements: int = 2**16,
    frozen: Any = None,
) -> StepShardings:
    """Shardings of a step on ``mesh`` for ``state`` (arrays or ``jax.eval_shape`` output).

    Params and every optimiser-state leaf that mirrors a param (AdamW's mu / nu) follow
    ``rules`` by path (fallback: :func:`hacbo_jax.trainer.sharding.fsdp_spec`); the controller's small
    arrays, counters and the RNG key are replicated. Batches are split along the micro-batch
    axis over ("data", "fsdp"); the dev batch too when ``dev_batch_size`` is divisible by the
    mesh size (otherwise every device computes the whole dev gradient).
    ``frozen``: the model's frozen state (LoRA's base model), sharded by the same rules as the
    params it holds (a base kernel's path ends like the full fine-tuning kernel's); None: the
    step shardings hold none (it is replicated, which suits the empty state of full fine-tuning).
    """
    specs = sharding_lib.partition_specs(state, mesh, rules, min_elements=min_elements)
    frozen_specs = (
        None
        if frozen is None
        else sharding_lib.partition_specs(frozen, mesh, rules, min_elements=min_elements)
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    batch = NamedSharding(mesh, sharding_lib.batch_spec(3, example_axis=1))
    return StepShardings(
        state=sharding_lib.named_shardings(mesh, specs),
        batch=batch,
        dev_buffer=replicated,
        dev_batch=batch if dev_batch_size % mesh.size == 0 else None,
        metrics=replicated,
        frozen=None if frozen is None else sharding_lib.named_shardings(mesh, frozen_specs),
    )
