"""LoRA adapters on the Qwen3 / Qwen2 / Llama port, added by model surgery.

Low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models")
replaces a frozen projection ``y = W x`` by::

    y = W x + (alpha / r) * B A dropout(x),     A: [r, in], B: [out, r], r << min(in, out)

with A ~ kaiming-uniform(a = sqrt(5)) (bound ``1 / sqrt(in)``) and B = 0, so the adapted model
starts exactly at the base model (Hugging Face PEFT's ``LoraLayer.reset_lora_parameters``).
Only A and B are trained; ``merge_lora`` folds ``(alpha / r) B A`` into W for export.

Design. :func:`add_lora` replaces chosen projections of an already built
:class:`~hacbo_jax.models.qwen3.Qwen3ForCausalLM` (``layer.self_attn.q_proj`` ...) by a
:class:`LoRALinear` that holds the original :class:`~hacbo_jax.models.qwen3.Linear` (``base``,
called unchanged) and a :class:`flax.nnx.LoRA` (``lora``, no base module) whose ``lora_a``
[in, r] / ``lora_b`` [r, out] are :class:`flax.nnx.LoRAParam` variables, so
``nnx.state(model, nnx.LoRAParam)`` (or :data:`LORA_PARAMS`) is exactly the adapter state and
:data:`BASE_PARAMS` the frozen rest. Why flax's ``LoRA`` core but not ``nnx.LoRALinear`` or
``LoRA(base_module=...)``: our kernels keep their head axes (q_proj [D, N, H], o_proj
[N, H, D]) and run as einsums, while ``LoRALinear`` subclasses ``nnx.Linear`` (a 2-D kernel,
another parameter layout and checkpoint mapping); ``base_module`` would feed the base the
adapter-promoted input and leaves no place for the ``alpha / r`` scale and the input dropout.
So the wrapper flattens the input axes of ``x`` (``in = prod(in_shape)``), runs ``nnx.LoRA``,
scales, and restores the output axes; flattening in the kernel's axis order is the order of
Hugging Face's ``weight[out, in]``, which is what makes PEFT's ``lora_A.weight = lora_a^T``
and ``lora_B.weight = lora_b^T`` (:mod:`hacbo_jax.models.lora_peft`).

The model file is not touched: adapters are added after construction, for an unrolled model
(one wrapper per layer) and for ``scan_layers=True`` (one wrapper in the stacked layer, adapter
leaves [L, in, r] / [L, r, out] created with ``nnx.vmap`` like the layers themselves, so
``lax.scan`` slices them with the base kernels). Remat and packed batches need nothing: the
wrapper is an ordinary part of the layer's computation.

Dropout is drawn from an explicit key, not from an ``nnx.Rngs`` stream. :func:`set_dropout_key`
(called on the model inside the traced loss) gives every wrapper with a rate > 0 a
:class:`LoRADropoutKey` variable: ``fold_in(fold_in(key, layer), module)``, one key [2] per
unrolled wrapper and a stacked [L, 2] in the scanned layer, which ``lax.scan`` slices like the
kernels, so every layer and projection draws its own mask. Why not a stream: a stream's counter
lives in the model state, which a jitted step closes over (``rest``) or ``lax.scan`` carries as
a per-layer slice, so its advance is lost and one mask is reused every step (and, broadcast
over the scan, in every layer). A key is a traced input: the step derives a new one per step
and micro-batch from its own PRNG state (so a resumed run draws the same masks), remat's
recomputation redraws the same mask, and the unrolled and scanned layouts draw identical
masks. Without a key (the default, evaluation, decoding, dev gradients) the adapters are
deterministic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hacbo_jax.models.qwen3 import Linear, Qwen3Config, Qwen3ForCausalLM

__all__ = [
    "BASE_PARAMS",
    "LORA_PARAMS",
    "TARGET_GROUPS",
    "TARGET_MODULES",
    "LoRADropoutKey",
    "LoRALinear",
    "LoRASettings",
    "add_lora",
    "has_lora",
    "lora_modules",
    "lora_problems",
    "lora_settings",
    "merge_lora",
    "resolve_targets",
    "set_dropout_key",
    "split_lora",
    "uses_dropout",
]

# Every projection an adapter may wrap, in the order of a decoder layer, with its parent module.
_PARENTS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
TARGET_MODULES: tuple[str, ...] = tuple(_PARENTS)
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all": TARGET_MODULES,
}
# Leading kernel axes that are input axes (o_proj [N, H, D] reads the heads; the rest one axis),
# the split Hugging Face's weight[out, in] flattens (hacbo_jax.models.qwen3_hf).
_INPUT_AXES = {"o_proj": 2}

LORA_PARAMS = nnx.LoRAParam
"""Filter of the adapter parameters (``nnx.state(model, LORA_PARAMS)``)."""
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
"""Filter of the frozen base parameters (``nnx.LoRAParam`` subclasses ``nnx.Param``)."""


def resolve_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """Module names of ``targets``: names from :data:`TARGET_MODULES` and/or groups of
    :data:`TARGET_GROUPS` (``"attn"``, ``"mlp"``, ``"all"``), as a sequence or one
    comma-separated string; returned once each, in layer order.

    Raises:
      ValueError: naming every unknown entry, or for an empty selection.
    """
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    chosen: set[str] = set()
    unknown = []
    for t in targets:
        if t in TARGET_GROUPS:
            chosen.update(TARGET_GROUPS[t])
        elif t in _PARENTS:
            chosen.add(t)
        else:
            unknown.append(t)
    if unknown:
        raise ValueError(
            f"unknown LoRA target module(s) {unknown}: allowed are {', '.join(TARGET_MODULES)} "
            f"and the groups {', '.join(TARGET_GROUPS)}"
        )
    if not chosen:
        raise ValueError("no LoRA target modules given")
    return tuple(t for t in TARGET_MODULES if t in chosen)


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """What :func:`add_lora` adds: rank r, alpha (scale ``alpha / r``, PEFT's; None = r, scale
    1), input dropout rate and the target module names (checked at construction)."""

    rank: int
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGET_MODULES

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        object.__setattr__(self, "alpha", float(self.rank if self.alpha is None else self.alpha))
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "targets", resolve_targets(self.targets))

    @property
    def scale(self) -> float:
        """``alpha / r``, the factor of the low-rank update."""
        return self.alpha / self.rank


def _peft_a_init(key, shape, dtype=jnp.float32):
    """PEFT's ``kaiming_uniform_(a=sqrt(5))`` of A[r, in]: U(-1/sqrt(in), 1/sqrt(in)); flax's
    ``lora_a`` is [in, r] (fan-in first)."""
    bound = 1.0 / math.sqrt(shape[-2])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRADropoutKey(nnx.Variable):
    """The dropout key of one adapter (raw key data: [2] unrolled, [L, 2] in a stacked layer),
    set by :func:`set_dropout_key` for one forward pass; not a parameter."""


def _dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout: ``x_i / (1 - rate)`` where ``bernoulli(key, 1 - rate)`` keeps element
    i, else 0, so ``E[dropout(x)] = x`` (``torch.nn.Dropout`` in train mode, PEFT's
    ``lora_dropout``; ``nnx.Dropout``'s formula)."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, x.shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class LoRALinear(nnx.Module):
    """``base(x) + (alpha / r) * lora(dropout(x))`` around one of our :class:`Linear`.

    ``base`` is the original projection (its kernel [*in_shape, *out_shape], or [L, ...] when
    it lives in a stacked layer) and is called as is; ``lora`` an :class:`nnx.LoRA` over the
    flattened axes (``lora_a`` [in, r], ``lora_b`` [r, out], both ``nnx.LoRAParam``) computing
    in the base's compute dtype. Dropout (rate > 0) acts on the adapter input only, and only
    while ``dropout_key`` holds a key (:func:`set_dropout_key`; None: deterministic).
    """

    def __init__(
        self,
        base: Linear,
        *,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        settings: LoRASettings,
        lora: nnx.LoRA,
    ):
        self.base = base
        self.lora = lora
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        self.rank = settings.rank
        self.alpha = settings.alpha
        self.scale = settings.scale
        self.dropout_rate = settings.dropout
        # data, not static: set_dropout_key puts a Variable here (None: no key, no dropout)
        self.dropout_key: LoRADropoutKey | None = nnx.data(None)

    def __call__(self, x: jax.Array, weight_grad: jax.Array | None = None) -> jax.Array:
        """``weight_grad`` (the layer's skip flag for kernel gradients) is accepted and not
        used: the base kernel is frozen, so its gradient is never taken, and the adapter's
        is a rank-r product not worth skipping (a controller's zero update still zeroes it)."""
        del weight_grad
        y = self.base(x)
        h = x
        if self.dropout_rate and self.dropout_key is not None:
            h = _dropout(x, self.dropout_rate, self.dropout_key[...])
        lead = h.shape[: h.ndim - len(self.in_shape)]
        delta = self.lora(h.reshape(*lead, math.prod(self.in_shape)))  # [..., out]
        delta = (delta * jnp.asarray(self.scale, delta.dtype)).reshape(*lead, *self.out_shape)
        return y + delta.astype(y.dtype)

    def delta_kernel(self) -> jax.Array:
        """``(alpha / r) * lora_a @ lora_b`` in float32, shaped like the base kernel
        ([*in_shape, *out_shape], with the leading L of a stacked layer)."""
        a = self.lora.lora_a[...].astype(jnp.float32)
        b = self.lora.lora_b[...].astype(jnp.float32)
        delta = self.scale * jnp.einsum("...ir,...ro->...io", a, b)
        return delta.reshape(*delta.shape[:-2], *self.in_shape, *self.out_shape)


def _layers(model: Qwen3ForCausalLM) -> tuple[list[Any], bool]:
    """The decoder layer modules and whether they are one stacked (scan_layers) layer."""
    layers = model.model.layers
    if model.scan_layers:
        return [layers], True
    return list(layers), False


def lora_modules(model: Qwen3ForCausalLM) -> Iterator[tuple[int | None, str, LoRALinear]]:
    """``(layer index or None for the stacked layer, module name, wrapper)`` of every adapter,
    layer by layer in :data:`TARGET_MODULES` order."""
    layers, stacked = _layers(model)
    for i, layer in enumerate(layers):
        for name, parent in _PARENTS.items():
            module = getattr(getattr(layer, parent), name, None)
            if isinstance(module, LoRALinear):
                yield (None if stacked else i), name, module


def has_lora(model: Qwen3ForCausalLM) -> bool:
    """Whether the model carries any adapter."""
    return next(lora_modules(model), None) is not None


def uses_dropout(model: Qwen3ForCausalLM) -> bool:
    """Whether any adapter of the model has a dropout rate > 0 (and so reads a key). Walks the
    whole object graph, so any nnx model may be asked (the training step asks its model)."""
    return any(
        isinstance(node, LoRALinear) and node.dropout_rate for _, node in nnx.iter_graph(model)
    )


def _adapter_key(key: jax.Array, layer: jax.Array | int, module: int) -> jax.Array:
    """``fold_in(fold_in(key, layer), module)``: the dropout key of one adapter."""
    return jax.random.fold_in(jax.random.fold_in(key, layer), module)


def set_dropout_key(model: Qwen3ForCausalLM, key: jax.Array | None) -> Qwen3ForCausalLM:
    """Gives every adapter with dropout its own key of ``key`` for the next forward pass (None:
    removes them, the adapters are deterministic again); returns ``model``.

    The adapter of module m (its index in :data:`TARGET_MODULES`) in layer i gets
    ``fold_in(fold_in(key, i), m)``: a stacked layer holds the L keys [L, 2] that ``lax.scan``
    slices, so the unrolled and the scanned model draw the same masks. Call it on the model
    merged inside the traced loss (``nnx.merge``), with a new ``key`` per step and micro-batch:
    set on a model outside a trace, the key is a constant and every call reuses its masks.
    ``key``: a typed key or raw key data.
    """
    if not uses_dropout(model):
        return model
    if key is not None and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    n_layers = model.config.num_hidden_layers
    for layer, name, module in lora_modules(model):
        if not module.dropout_rate:
            continue
        if key is None:
            module.dropout_key = None
            continue
        index = TARGET_MODULES.index(name)
        if layer is None:  # the stacked layer: one key per layer, sliced by lax.scan
            keys = jax.vmap(lambda i, m=index: _adapter_key(key, i, m))(jnp.arange(n_layers))
        else:
            keys = _adapter_key(key, layer, index)
        module.dropout_key = LoRADropoutKey(keys)
    return model


def lora_settings(model: Qwen3ForCausalLM) -> LoRASettings | None:
    """The settings the model's adapters were added with (None without adapters).

    Raises:
      ValueError: when the adapters disagree on rank, alpha or dropout (not made by one
        :func:`add_lora` call).
    """
    found = {(m.rank, m.alpha, m.dropout_rate) for _, _, m in lora_modules(model)}
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"the model's adapters differ in (rank, alpha, dropout): {sorted(found)}")
    rank, alpha, dropout = found.pop()
    targets = tuple(dict.fromkeys(name for _, name, _ in lora_modules(model)))
    return LoRASettings(rank=rank, alpha=alpha, dropout=dropout, targets=targets)


def _shapes(name: str, kernel_shape: tuple[int, ...], stacked: bool):
    """(in_shape, out_shape) of a projection kernel, the leading L of a stacked one dropped."""
    shape = kernel_shape[1:] if stacked else kernel_shape
    n_in = _INPUT_AXES.get(name, 1)
    return tuple(shape[:n_in]), tuple(shape[n_in:])


def _module_dims(config: Qwen3Config, name: str) -> tuple[int, int]:
    """(in, out) features of a projection of ``config`` (flattened as Hugging Face's)."""
    d, f = config.hidden_size, config.intermediate_size
    q, kv = (
        config.num_attention_heads * config.head_dim,
        config.num_key_value_heads * config.head_dim,
    )
    return {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }[name]


def lora_problems(config: Qwen3Config, rank: Any, targets: Any) -> list[str]:
    """Every reason why adapters of ``rank`` on ``targets`` cannot be added to a model of
    ``config`` (empty: they can): unknown target names, a rank that is not a positive integer
    or exceeds ``min(in, out)`` of a targeted projection (the update could not be low-rank).
    Needs only the config, so a run checks it before loading any weights."""
    problems = []
    try:
        names = resolve_targets(targets)
    except ValueError as e:
        problems.append(str(e))
        names = ()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        problems.append(f"LoRA rank must be a positive integer, got {rank!r}")
        return problems
    too_big = []
    for name in names:
        n_in, n_out = _module_dims(config, name)
        if rank > min(n_in, n_out):
            too_big.append(f"{name} [{n_out}, {n_in}] (at most {min(n_in, n_out)})")
    if too_big:
        problems.append(
            f"LoRA rank {rank} is larger than the smaller dimension of " + ", ".join(too_big)
        )
    return problems


def _new_lora(
    n_in: int, rank: int, n_out: int, *, dtype: Any, layers: int | None, key: jax.Array
) -> nnx.LoRA:
    """An ``nnx.LoRA`` with PEFT's initialisation (float32 params); with ``layers`` its leaves
    are stacked [L, in, r] / [L, r, out], one independent draw per layer (``nnx.vmap``, as the
    model stacks its layers)."""

    def make(rngs: nnx.Rngs) -> nnx.LoRA:
        return nnx.LoRA(
            n_in,
            rank,
            n_out,
            dtype=dtype,
            param_dtype=jnp.float32,
            a_initializer=_peft_a_init,
            rngs=rngs,
        )

    if layers is None:
        return make(nnx.Rngs(params=key))
    stacked = nnx.split_rngs(splits=layers)(nnx.vmap(make, in_axes=(0,), out_axes=0))
    return stacked(nnx.Rngs(params=key))


def add_lora(
    model: Qwen3ForCausalLM,
    rank: int | LoRASettings,
    *,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: str | Sequence[str] = "all",
    base_dtype: Any = None,
    rngs: nnx.Rngs | None = None,
) -> Qwen3ForCausalLM:
    """Adds LoRA adapters to ``model`` in place (and returns it).

    Args:
      model: a :class:`Qwen3ForCausalLM` (Qwen3, Qwen2 or Llama; unrolled or ``scan_layers``).
      rank: r, or a :class:`LoRASettings` (then ``alpha``/``dropout``/``targets`` are ignored).
      alpha: the update is scaled by ``alpha / r`` (PEFT's ``lora_alpha``; None = r).
      dropout: dropout rate on the adapter input, applied only while a key is set
        (:func:`set_dropout_key`, which the training step calls with a key per step and
        micro-batch); unrolled or ``scan_layers``.
      targets: module names and/or groups (:func:`resolve_targets`), default ``"all"``.
      base_dtype: dtype to hold the frozen base parameters in (e.g. ``jnp.bfloat16``; None =
        keep); adapters stay float32 and the forward computes in the model's ``dtype``.
      rngs: randomness of A's initialisation (``params`` stream; default ``nnx.Rngs(0)``).

    Raises:
      ValueError: listing every problem (unknown target, bad rank, rank above a targeted
        projection's smaller dimension, a targeted module the model lacks or already adapted),
        before the model is changed.
    """
    settings = (
        rank
        if isinstance(rank, LoRASettings)
        else LoRASettings(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
    )
    rngs = nnx.Rngs(0) if rngs is None else rngs
    layers, stacked = _layers(model)
    problems = lora_problems(model.config, settings.rank, settings.targets)
    for i, layer in enumerate(layers):
        for name in settings.targets:
            module = getattr(getattr(layer, _PARENTS[name], None), name, None)
            where = f"layers.{'*' if stacked else i}.{_PARENTS[name]}.{name}"
            if isinstance(module, LoRALinear):
                problems.append(f"{where} already has a LoRA adapter (merge_lora first)")
            elif not isinstance(module, Linear):
                problems.append(f"{where}: the model has no such projection")
    if problems:
        raise ValueError("cannot add LoRA adapters:\n  - " + "\n  - ".join(problems))

    n_layers = model.config.num_hidden_layers
    for layer in layers:
        for name in settings.targets:
            parent = getattr(layer, _PARENTS[name])
            base = getattr(parent, name)
            in_shape, out_shape = _shapes(name, tuple(base.kernel.shape), stacked)

            lora = _new_lora(
                math.prod(in_shape),
                settings.rank,
                math.prod(out_shape),
                dtype=base.dtype,
                layers=n_layers if stacked else None,
                key=rngs.params(),
            )
            setattr(
                parent,
                name,
                LoRALinear(
                    base,
                    in_shape=in_shape,
                    out_shape=out_shape,
                    settings=settings,
                    lora=lora,
                ),
            )
    if base_dtype is not None:
        for _, var in nnx.to_flat_state(nnx.state(model, BASE_PARAMS)):
            var.set_value(var[...].astype(base_dtype))
    return model


def split_lora(model: Qwen3ForCausalLM) -> tuple[nnx.GraphDef, dict, nnx.State]:
    """``(graphdef, adapters, rest)`` for a training step that differentiates the adapters only:
    ``adapters`` the pure dict of the ``nnx.LoRAParam`` state, ``rest`` everything else (the
    frozen base) as a State of plain arrays; ``nnx.merge(graphdef, nnx.State(adapters), rest)``
    rebuilds the model.

    ``rest`` holds arrays, not the model's Variables, so that every merge inside a traced
    function makes fresh Variables: ``nnx.remat`` writes its layer's state back after the
    call, which fails on Variables made outside the trace (flax's TraceContextError).
    """
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    return graphdef, nnx.to_pure_dict(adapters), nnx.State(nnx.to_pure_dict(rest))


def merge_lora(model: Qwen3ForCausalLM) -> Qwen3ForCausalLM:
    """Folds every adapter into its base kernel (``W + (alpha / r) A B``, summed in float32,
    stored in the kernel's dtype) and puts the plain :class:`Linear` back; returns ``model``,
    now without adapters (``save_pretrained`` writes it in Hugging Face's format).

    The merged kernel is a NEW variable: a state the model shares variables with (``nnx.merge``
    of a training state) keeps the unmerged base.
    """
    layers, _ = _layers(model)
    for layer in layers:
        for name, parent_name in _PARENTS.items():
            parent = getattr(layer, parent_name)
            wrapper = getattr(parent, name, None)
            if not isinstance(wrapper, LoRALinear):
                continue
            base = wrapper.base
            kernel = base.kernel[...]
            merged = (kernel.astype(jnp.float32) + wrapper.delta_kernel()).astype(kernel.dtype)
            base.kernel = nnx.Param(merged)
            setattr(parent, name, base)
    return model
