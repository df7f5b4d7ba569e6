"""Qwen3 (dense) in Flax NNX, with Hugging Face checkpoint load/save and logit parity.

Reference: transformers' ``modeling_qwen3.py`` (PyTorch) and the Qwen3 technical report.
Architecture per decoder layer (pre-norm)::

    h = x + o_proj(attn(rope(q_norm(q_proj(rms(x)))), rope(k_norm(k_proj(rms(x)))), v_proj(rms(x))))
    y = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))

with grouped-query attention (query head n reads key/value head n // (N / K)), a per-head
RMSNorm on queries and keys before RoPE, RoPE angles and softmax in float32, and logits
``norm(h) @ E^T`` when the embeddings are tied (one parameter, not a copy).

Parameter paths mirror Hugging Face's names (``model.layers.3.self_attn.q_proj``); projection
kernels are stored input-axes-first with heads split out (q_proj: [D, N, H], o_proj: [N, H, D]).
Everything that knows Hugging Face's names, layouts and files lives in
:mod:`hacbo_jax.models.qwen3_hf`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "ATTENTION_IMPLS",
    "REMAT_POLICIES",
    "AttentionMask",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "positions_from_mask",
    "einsum_skippable_weight_grad",
    "positions_from_segments",
]

KVCache = tuple[tuple[jax.Array, jax.Array], ...]

# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
LLAMA3_ROPE_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Hyper-parameters of a dense Qwen3 model, with Hugging Face's field names.

    Only the fields the architecture uses are kept; :meth:`from_hf` reads each of them from a
    ``config.json`` (falling back to transformers' own ``Qwen3Config`` defaults for keys the
    file omits) and rejects configs that need features this port does not implement.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # Architecture options beyond Qwen3 (Qwen2/Qwen2.5 and Llama 3 are the same port with these):
    # the family written to config.json, per-head q/k RMSNorm (Qwen3 only), a bias on o_proj
    # (None: same as attention_bias; Qwen2 has q/k/v biases but none on o_proj) and RoPE scaling
    # (None, or Llama 3's {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}, kept as sorted (key, value) pairs
    # so the config stays hashable).
    model_type: str = "qwen3"
    qk_norm: bool = True
    attention_out_bias: bool | None = None
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if isinstance(self.eos_token_id, list):  # keep the config hashable (it is static in jit)
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.attention_out_bias is None:
            object.__setattr__(self, "attention_out_bias", self.attention_bias)
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"Qwen3Config.model_type={self.model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            if scaling.get("rope_type") != "llama3":
                raise ValueError(
                    f"Qwen3Config.rope_scaling rope_type={scaling.get('rope_type')!r} is not "
                    "supported (only 'llama3'; None means plain RoPE)"
                )
            missing = [k for k in LLAMA3_ROPE_KEYS if k not in scaling]
            if missing:
                raise ValueError(f"Qwen3Config.rope_scaling (llama3) is missing {missing}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"Qwen3Config.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")

    @classmethod
    def qwen3_0_6b(cls) -> Qwen3Config:
        """The Qwen/Qwen3-0.6B architecture (values from its published config.json)."""
        return cls(
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            tie_word_embeddings=True,
            attention_bias=False,
            max_position_embeddings=40960,
            bos_token_id=151643,
            eos_token_id=151645,
        )

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> Qwen3Config:
        """Builds a config from a Hugging Face ``config.json`` (a dict, the file, or its directory).

        See :func:`hacbo_jax.models.qwen3_hf.config_from_hf`.
        """
        from hacbo_jax.models.qwen3_hf import config_from_hf

        return config_from_hf(config)

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers.Qwen3ForCausalLM`` loads."""
        from hacbo_jax.models.qwen3_hf import config_to_hf_dict

        return config_to_hf_dict(self, dtype)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class Linear(nnx.Module):
    """A bias-optional projection ``y = einsum(spec, x, kernel) (+ bias)``.

    The kernel is stored input axes first (``in_shape + out_shape``) in ``param_dtype`` and cast
    to ``dtype`` for the matmul, so fp32 master weights can drive bf16 compute.
    """

    def __init__(
        self,
        einsum: str,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        *,
        use_bias: bool,
        std: float,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        self.einsum = einsum
        self.dtype = dtype
        self.kernel = nnx.Param(
            std * jax.random.normal(rngs.params(), in_shape + out_shape, param_dtype)
        )
        self.bias = nnx.Param(jnp.zeros(out_shape, param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array, weight_grad: jax.Array | None = None) -> jax.Array:
        """``weight_grad`` (bool scalar, traced): whether the backward pass computes this
        projection's kernel gradient (:func:`einsum_skippable_weight_grad`); None: always."""
        x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        if weight_grad is None:
            y = jnp.einsum(self.einsum, x, kernel)
        else:
            y = einsum_skippable_weight_grad(self.einsum, x, kernel, weight_grad)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_skippable_weight_grad(
    spec: str, x: jax.Array, kernel: jax.Array, weight_grad: jax.Array
) -> jax.Array:
    """``einsum(spec, x, kernel)`` whose backward pass computes the kernel's gradient only when
    ``weight_grad`` (a traced bool scalar) is True, and returns zeros otherwise.

    The input gradient is always computed: the layers below need it. The kernel gradient (a
    contraction over every token, as costly as the forward matmul) sits under ``lax.cond``, so
    a block whose update is known to be zero this step skips that work at run time while every
    selection runs the same compiled program (the flag is data). Both gradients are the
    transposes JAX's own autodiff of the einsum would use (``jax.vjp`` of it), so a computed
    gradient equals the plain einsum's. ``weight_grad`` must not be batched by ``vmap`` (a
    batched predicate turns the ``cond`` into a select that computes both branches); under
    ``lax.scan`` each layer gets its own scalar.
    """
    del weight_grad
    return jnp.einsum(spec, x, kernel)


def _skippable_fwd(spec, x, kernel, weight_grad):
    return jnp.einsum(spec, x, kernel), (x, kernel, weight_grad)


def _skippable_bwd(spec, residuals, g):
    x, kernel, weight_grad = residuals
    _, input_vjp = jax.vjp(lambda x_: jnp.einsum(spec, x_, kernel), x)
    (dx,) = input_vjp(g)

    def kernel_grad():
        _, kernel_vjp = jax.vjp(lambda k_: jnp.einsum(spec, x, k_), kernel)
        return kernel_vjp(g)[0]

    dkernel = jax.lax.cond(weight_grad, kernel_grad, lambda: jnp.zeros_like(kernel))
    return dx, dkernel, None


einsum_skippable_weight_grad.defvjp(_skippable_fwd, _skippable_bwd)


class RMSNorm(nnx.Module):
    """``w * x / sqrt(mean(x^2) + eps)`` over the last axis, normalised in float32.

    Like transformers, the normalised value is cast back to the input dtype before the scale.
    """

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.eps = eps
        self.dtype = dtype
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * x32.astype(x.dtype)


class Embedding(nnx.Module):
    """Token embedding table ``weight[V, D]``; also the output projection when tied."""

    def __init__(self, vocab: int, dim: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.weight = nnx.Param(std * jax.random.normal(rngs.params(), (vocab, dim), param_dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)

    def attend(self, h: jax.Array) -> jax.Array:
        return jnp.einsum("BTD,VD->BTV", h, self.weight[...].astype(self.dtype))


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Token positions counted over real tokens only (0 at the first non-pad token).

    Pads get position 0; their outputs are never used. This is what transformers' ``generate``
    passes as ``position_ids``, so left-padded rows see the same positions as unpadded ones.
    """
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Per-segment positions of a packed row: ``t - (first column of t's segment)``.

    ``segment_ids`` int[B, T] (0 = padding); a segment is a maximal run of one id, so RoPE
    restarts at 0 at every segment start. Padding columns get positions too (never used).
    """
    t = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    starts = jnp.concatenate(
        [
            jnp.ones(segment_ids.shape[:-1] + (1,), jnp.bool_),
            segment_ids[..., 1:] != segment_ids[..., :-1],
        ],
        axis=-1,
    )
    start_col = jax.lax.cummax(jnp.where(starts, t, 0), axis=segment_ids.ndim - 1)
    return t - start_col


def rope_inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None):
    """RoPE inverse frequencies float32[head_dim / 2]: ``theta^(-2i/head_dim)``, rescaled for
    Llama 3 when ``scaling`` is its ``rope_parameters`` (transformers'
    ``_compute_llama3_parameters``): wavelengths ``2 pi / f`` above ``L / low_freq_factor``
    (L = original_max_position_embeddings) are divided by ``factor``, those below
    ``L / high_freq_factor`` kept, and the band between interpolated with
    ``s = (L / wavelength - low) / (high - low)``: ``(1 - s) f / factor + s f``."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if scaling is None:
        return inv_freq
    factor, low, high = (float(scaling[k]) for k in LLAMA3_ROPE_KEYS[:3])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(
    positions: jax.Array,
    head_dim: int,
    theta: float,
    scaling: tuple[tuple[str, Any], ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables float32[B, T, head_dim / 2] of angles ``pos * inv_freq``
    (:func:`rope_inv_freq`; ``scaling`` as in :attr:`Qwen3Config.rope_scaling`).

    Half width: transformers duplicates the angles to the full head width; :func:`apply_rope`
    rotates the two halves with the same table instead, which is the same arithmetic.
    """
    inv_freq = jnp.asarray(
        rope_inv_freq(head_dim, theta, None if scaling is None else dict(scaling))
    )
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates pairs (i, i + H/2) of x[B, T, N, H] by the angles of cos/sin[B, T, H/2].

    ``[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]`` (transformers' ``x cos + rotate_half(x)
    sin`` with its duplicated table), one concatenation and no full-width tables.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------

REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("einsum", "xla", "cudnn")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["segment_ids", "explicit"],
    meta_fields=["packed"],
)
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """What a query may attend to, in one of two forms (exactly one is set).

    * ``segment_ids`` int[B, T] (training, no cache): query t attends key s iff ``s <= t``,
      ``segment_ids[s] != 0`` and ``segment_ids[t] == segment_ids[s]``. A padded batch is the
      one-segment case (``segment_ids = attention_mask``); a packed row has ids 1, 2, ...
      ``packed`` says which (static): the ``xla``/``cudnn`` implementations express a padded
      batch as sequence lengths (right padding assumed) and a packed one as an explicit mask.
    * ``explicit`` bool[B, 1, T, S] (KV-cache decoding): True where query t may read slot s.
    """

    segment_ids: jax.Array | None = None
    explicit: jax.Array | None = None
    packed: bool = False

    def allowed(self, t: int, s: int) -> jax.Array:
        """bool[B, T, S], computed from iotas (no [B, 1, T, T] input is materialised)."""
        if self.explicit is not None:
            return self.explicit[:, 0]
        seg = self.segment_ids
        causal = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]
        return causal[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)


def grouped_attention(q, k, v, mask: AttentionMask, *, scale: float) -> jax.Array:
    """Grouped-query softmax attention without repeating K/V heads.

    Einsum axes: b batch, t query position, s key position, k key/value head, g query head
    within its group (query head n = k * G + g, as transformers' ``repeat_kv``), h head dim.
    ``q[b,t,(k g),h] -> scores[b,k,g,t,s] = scale * sum_h q[b,t,k,g,h] key[b,s,k,h]``, masked
    to the dtype's lowest value, softmax over s in float32, ``out[b,t,k,g,h] = sum_s p v``.
    Returns [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    allowed = mask.allowed(t, k.shape[1])[:, None, None]  # [B, 1, 1, T, S]
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


def library_attention(q, k, v, mask: AttentionMask, *, scale: float, implementation: str):
    """``jax.nn.dot_product_attention`` with causal and length/segment arguments.

    A padded batch (``mask.packed`` False) is passed as ``is_causal=True`` with
    ``query_seq_lengths = key_value_seq_lengths = segment_ids.sum(-1)``, which assumes RIGHT
    padding (training batches); a packed batch as ``is_causal=True`` plus the segment mask
    bool[B, 1, T, T]; a KV-cache mask as given. ``implementation`` is ``"xla"`` or ``"cudnn"``.
    """
    if mask.explicit is not None:
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask.explicit, scale=scale, implementation=implementation
        )
    seg = mask.segment_ids
    if mask.packed:
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=same[:, None],
            scale=scale,
            is_causal=True,
            implementation=implementation,
        )
    lengths = jnp.sum(seg != 0, axis=-1, dtype=jnp.int32)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=True,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )


def _project(linear: nnx.Module, x: jax.Array, weight_grad: jax.Array | None) -> jax.Array:
    """``linear(x)``, passing ``weight_grad`` on only when it is set (an adapter wrapper that
    replaces a projection need not know the argument unless skipping is used)."""
    return linear(x) if weight_grad is None else linear(x, weight_grad=weight_grad)


class Qwen3Attention(nnx.Module):
    """Grouped-query self-attention with per-head q/k RMSNorm and RoPE."""

    def __init__(
        self,
        config: Qwen3Config,
        *,
        dtype,
        param_dtype,
        attention_impl: str = "einsum",
        rngs: nnx.Rngs,
    ):
        d, n, k, h = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        common = dict(
            use_bias=config.attention_bias,
            std=config.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.q_proj = Linear("BTD,DNH->BTNH", (d,), (n, h), **common)
        self.k_proj = Linear("BTD,DKH->BTKH", (d,), (k, h), **common)
        self.v_proj = Linear("BTD,DKH->BTKH", (d,), (k, h), **common)
        common["use_bias"] = config.attention_out_bias
        self.o_proj = Linear("BTNH,NHD->BTD", (n, h), (d,), **common)
        if config.qk_norm:
            self.q_norm = RMSNorm(h, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.k_norm = RMSNorm(h, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        else:  # Qwen2, Llama
            self.q_norm = self.k_norm = None
        self.scale = h**-0.5
        self.attention_impl = attention_impl

    def __call__(
        self, x, cos, sin, mask: AttentionMask, cache=None, cache_index=None, weight_grad=None
    ):
        q, k = _project(self.q_proj, x, weight_grad), _project(self.k_proj, x, weight_grad)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = _project(self.v_proj, x, weight_grad)
        if cache is not None:
            # Left-padded batches write all rows at the same slot, so one dynamic slice suffices.
            k = jax.lax.dynamic_update_slice(
                cache[0], k.astype(cache[0].dtype), (0, cache_index, 0, 0)
            )
            v = jax.lax.dynamic_update_slice(
                cache[1], v.astype(cache[1].dtype), (0, cache_index, 0, 0)
            )
            cache = (k, v)
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        if self.attention_impl == "einsum":
            out = grouped_attention(q, k, v, mask, scale=self.scale)
        else:
            out = library_attention(
                q, k, v, mask, scale=self.scale, implementation=self.attention_impl
            )
        return _project(self.o_proj, out, weight_grad), cache


class Qwen3MLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: Qwen3Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        common = dict(
            use_bias=False,
            std=config.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.gate_proj = Linear("BTD,DF->BTF", (d,), (f,), **common)
        self.up_proj = Linear("BTD,DF->BTF", (d,), (f,), **common)
        self.down_proj = Linear("BTF,FD->BTD", (f,), (d,), **common)

    def __call__(self, x, weight_grad=None):
        gate = _project(self.gate_proj, x, weight_grad)
        up = _project(self.up_proj, x, weight_grad)
        return _project(self.down_proj, jax.nn.silu(gate) * up, weight_grad)


class Qwen3DecoderLayer(nnx.Module):
    def __init__(
        self,
        config: Qwen3Config,
        *,
        dtype,
        param_dtype,
        attention_impl: str = "einsum",
        rngs: nnx.Rngs,
    ):
        self.input_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.self_attn = Qwen3Attention(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            attention_impl=attention_impl,
            rngs=rngs,
        )
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.mlp = Qwen3MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self, x, cos, sin, mask: AttentionMask, cache=None, cache_index=None, weight_grad=None
    ):
        """``weight_grad``: None, or a traced bool scalar saying whether the backward pass
        computes this layer's projection kernel gradients (False: zeros, only the input
        gradient flows on; :func:`einsum_skippable_weight_grad`). Norm weights and biases
        always get theirs (elementwise work)."""
        attn, cache = self.self_attn(
            self.input_layernorm(x), cos, sin, mask, cache, cache_index, weight_grad
        )
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x), weight_grad)
        return x, cache


def _remat_layer(layer: Qwen3DecoderLayer, x, cos, sin, mask, weight_grad=None):
    return layer(x, cos, sin, mask, weight_grad=weight_grad)[0]


def _checkpoint_policy(remat: str):
    """jax.checkpoint policy of a remat mode ("full": save nothing, "dots": keep matmul outputs
    without batch dimensions, i.e. the projections, and recompute the rest)."""
    if remat == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return jax.checkpoint_policies.nothing_saveable


class Qwen3Model(nnx.Module):
    """Embeddings, decoder stack and final norm (HF's ``model.*`` sub-tree).

    With ``scan_layers`` the decoder layers are ONE ``Qwen3DecoderLayer`` whose parameters carry
    a leading layer axis L (``layers/mlp/up_proj/kernel``: [L, D, F]; slice i is layer i), run
    with ``jax.lax.scan``; otherwise an ``nnx.List`` of L layers run by a Python loop.
    """

    def __init__(
        self,
        config: Qwen3Config,
        *,
        dtype,
        param_dtype,
        remat: str,
        scan_layers: bool = False,
        attention_impl: str = "einsum",
        rngs: nnx.Rngs,
    ):
        self.embed_tokens = Embedding(
            config.vocab_size,
            config.hidden_size,
            std=config.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

        def make_layer(rngs):
            return Qwen3DecoderLayer(
                config,
                dtype=dtype,
                param_dtype=param_dtype,
                attention_impl=attention_impl,
                rngs=rngs,
            )

        if scan_layers:
            make_stacked = nnx.split_rngs(splits=config.num_hidden_layers)(
                nnx.vmap(make_layer, in_axes=(0,), out_axes=0)
            )
            self.layers = make_stacked(rngs)
        else:
            self.layers = nnx.List([make_layer(rngs) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.remat = remat
        self.scan_layers = scan_layers
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.rope_scaling = config.rope_scaling

    def __call__(
        self,
        input_ids,
        positions,
        mask: AttentionMask | jax.Array,
        cache: KVCache | None = None,
        cache_index=None,
        weight_grads: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """``weight_grads``: None, or bool[L], whether each decoder layer's projection kernel
        gradients are computed in the backward pass (training without a cache only)."""
        if weight_grads is not None and cache is not None:
            raise ValueError("weight_grads is for training; it cannot be used with a KV cache")
        if not isinstance(mask, AttentionMask):
            mask = AttentionMask(explicit=mask)
        x = self.embed_tokens(input_ids)
        cos, sin = rope_tables(positions, self.head_dim, self.rope_theta, self.rope_scaling)
        if self.scan_layers:
            return self._scan(x, cos, sin, mask, cache, cache_index, weight_grads)
        new_cache = []
        for i, layer in enumerate(self.layers):
            flag = None if weight_grads is None else weight_grads[i]
            if cache is None and self.remat != "none":
                policy = _checkpoint_policy(self.remat)
                x = nnx.remat(_remat_layer, policy=policy)(layer, x, cos, sin, mask, flag)
            else:
                x, layer_cache = layer(
                    x,
                    cos,
                    sin,
                    mask,
                    None if cache is None else cache[i],
                    cache_index,
                    weight_grad=flag,
                )
                new_cache.append(layer_cache)
        return self.norm(x), (None if cache is None else tuple(new_cache))

    def _scan(self, x, cos, sin, mask, cache, cache_index, weight_grads=None):
        """``lax.scan`` over the stacked layer state; the cache (if any) is the stacked pair
        (keys, values) [L, B, S, K, H], scanned alongside and returned restacked.
        ``weight_grads`` bool[L] (if given) is scanned alongside: layer i reads its own flag."""
        graphdef, layer_state = nnx.split(self.layers)

        if cache is None:

            def body(x, xs):
                state, flag = xs
                return nnx.merge(graphdef, state)(x, cos, sin, mask, weight_grad=flag)[0], None

            if self.remat != "none":
                body = jax.checkpoint(
                    body, policy=_checkpoint_policy(self.remat), prevent_cse=False
                )
            x, _ = jax.lax.scan(body, x, (layer_state, weight_grads))
            return self.norm(x), None

        def body_cached(x, xs):
            state, layer_cache = xs
            x, layer_cache = nnx.merge(graphdef, state)(x, cos, sin, mask, layer_cache, cache_index)
            return x, layer_cache

        x, new_cache = jax.lax.scan(body_cached, x, (layer_state, tuple(cache)))
        return self.norm(x), new_cache


# --------------------------------------------------------------------------------------------
# Causal LM
# --------------------------------------------------------------------------------------------


class Qwen3ForCausalLM(nnx.Module):
    """Qwen3 causal language model (``transformers.Qwen3ForCausalLM`` in Flax NNX).

    Args:
      config: the architecture.
      dtype: compute dtype (activations and matmuls); logits are returned in float32.
      param_dtype: storage dtype of the parameters (e.g. float32 master weights with bf16 compute).
      remat: rematerialisation of each decoder layer in the backward pass: ``"none"`` (keep all
        activations), ``"full"`` (keep only the layer input, recompute the rest) or ``"dots"``
        (keep the outputs of the weight matmuls, the ``dots_with_no_batch_dims_saveable``
        policy: q/k/v/o and MLP projections; recompute norms, RoPE, attention and activations).
        ``True``/``False`` are accepted for ``"full"``/``"none"``.
      scan_layers: store the decoder layers' parameters stacked on a leading layer axis
        (``model/layers/<module path>``, leaf [L, ...]) and run them with ``jax.lax.scan``: one
        compiled layer instead of L, smaller HLO and XLA temporaries. Hugging Face load/save
        are unchanged (stacked/unstacked there). With a KV cache, :meth:`init_cache` returns
        the stacked pair (keys, values) [L, B, S, K, H] instead of one pair per layer.
      attention_impl: ``"einsum"`` (default; grouped-query einsum with the mask computed from
        iotas, no K/V head repeat: the CPU path), ``"xla"`` or ``"cudnn"``
        (``jax.nn.dot_product_attention(implementation=...)`` with ``is_causal`` plus sequence
        lengths for right-padded batches or a segment mask for packed ones; ``"cudnn"`` is the
        GPU path and needs a CUDA backend).
      rngs: initialisation randomness (normal(0, initializer_range) weights, unit norms).
    """

    def __init__(
        self,
        config: Qwen3Config,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool | str = False,
        scan_layers: bool = False,
        attention_impl: str = "einsum",
        rngs: nnx.Rngs | None = None,
    ):
        remat = (
            {True: "full", False: "none"}.get(remat, remat) if isinstance(remat, bool) else remat
        )
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be True, False or one of {REMAT_POLICIES}, got {remat!r}")
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}"
            )
        if attention_impl == "cudnn" and jax.default_backend() != "gpu":
            raise ValueError(
                f"attention_impl='cudnn' needs a CUDA GPU backend, but jax's default backend is "
                f"{jax.default_backend()!r}; use 'einsum' (CPU) or 'xla'"
            )
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.scan_layers = bool(scan_layers)
        self.attention_impl = attention_impl
        self.model = Qwen3Model(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            remat=remat,
            scan_layers=self.scan_layers,
            attention_impl=attention_impl,
            rngs=rngs,
        )
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(
                "BTD,DV->BTV",
                (config.hidden_size,),
                (config.vocab_size,),
                use_bias=False,
                std=config.initializer_range,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Logits float32[B, T, V] for input_ids int[B, T].

        ``attention_mask`` (1 = token, 0 = pad; left or right padding) masks pad keys and sets
        positions to the count of real tokens before each one. Outputs at pad positions are
        meaningless. For packed rows pass ``segment_ids`` instead (see :meth:`hidden_states`).
        """
        return self.lm_logits(
            self.hidden_states(
                input_ids, attention_mask, segment_ids=segment_ids, positions=positions
            )
        )

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        weight_grads: jax.Array | None = None,
    ) -> jax.Array:
        """Final-norm hidden states [B, T, D] in the compute dtype (``lm_logits`` maps them).

        Lets a loss compute the [T, V] logits chunk by chunk instead of all at once.

        Packed rows: ``segment_ids`` int[B, T] (1, 2, ... per example, 0 = padding) gives a
        block-diagonal causal mask (a token attends to earlier tokens of its own segment only)
        and, unless ``positions`` int[B, T] is given, RoPE positions restarting at 0 in every
        segment (:func:`positions_from_segments`). ``attention_mask`` must then be None.

        ``weight_grads`` bool[L] (traced; None = all True): whether the backward pass computes
        decoder layer i's projection kernel gradients. A False layer passes the input gradient
        through and returns zero kernel gradients, skipping that work at run time; the forward
        pass is unchanged (:func:`einsum_skippable_weight_grad`).
        """
        if segment_ids is not None:
            if attention_mask is not None:
                raise ValueError(
                    "pass either attention_mask (padded batch) or segment_ids (packed batch), "
                    "not both"
                )
            if segment_ids.shape != input_ids.shape:
                raise ValueError(
                    f"segment_ids shape {segment_ids.shape} != input_ids shape {input_ids.shape}"
                )
            segment_ids = segment_ids.astype(jnp.int32)
            mask = AttentionMask(segment_ids=segment_ids, packed=True)
            if positions is None:
                positions = positions_from_segments(segment_ids)
        else:
            if attention_mask is None:
                attention_mask = jnp.ones(input_ids.shape, jnp.int32)
            valid = attention_mask.astype(jnp.int32)
            mask = AttentionMask(segment_ids=valid, packed=False)
            if positions is None:
                positions = positions_from_mask(valid)
        if weight_grads is not None:
            weight_grads = jnp.asarray(weight_grads, jnp.bool_)
            if weight_grads.shape != (self.config.num_hidden_layers,):
                raise ValueError(
                    f"weight_grads must be bool[{self.config.num_hidden_layers}] (one flag per "
                    f"decoder layer), got shape {weight_grads.shape}"
                )
        h, _ = self.model(input_ids, positions, mask, weight_grads=weight_grads)
        return h

    def lm_logits(self, h: jax.Array) -> jax.Array:
        """Logits float32[B, T, V] of hidden states [B, T, D] (``h @ E^T`` when tied)."""
        if self.lm_head is None:
            logits = self.model.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h)
        return logits.astype(jnp.float32)

    def forward_with_cache(
        self,
        input_ids,
        positions,
        mask,
        cache: KVCache | None = None,
        cache_index=None,
        *,
        last_only: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """Low-level forward used by generation.

        Args:
          input_ids: int[B, T]; positions: int[B, T] (RoPE positions).
          mask: bool[B, 1, T, S], True where query t may attend key slot s (S = T without a cache,
            the cache length with one).
          cache: from :meth:`init_cache`; the new keys/values are written at slots
            ``cache_index .. cache_index + T``.
          last_only: compute logits for the last position only (prefill needs no more).
        Returns: (logits float32[B, T or 1, V], updated cache or None).
        """
        h, cache = self.model(
            input_ids, positions, AttentionMask(explicit=mask), cache, cache_index
        )
        if last_only:
            h = h[:, -1:]
        return self.lm_logits(h), cache

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """Zeroed key/value cache in the compute dtype: one pair ([B, S, K, H] keys, values) per
        layer, or with ``scan_layers`` the stacked pair ([L, B, S, K, H] keys, values)."""
        c = self.config
        shape = (batch_size, max_length, c.num_key_value_heads, c.head_dim)
        if self.scan_layers:
            stacked = (c.num_hidden_layers, *shape)
            return (jnp.zeros(stacked, self.dtype), jnp.zeros(stacked, self.dtype))
        return tuple(
            (jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
            for _ in range(c.num_hidden_layers)
        )

    # ---- checkpoints ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool | str = False,
        scan_layers: bool = False,
        attention_impl: str = "einsum",
    ) -> Qwen3ForCausalLM:
        """Loads a Hugging Face Qwen3 checkpoint (local directory, or a hub id when online).

        Arguments after the path are the constructor's. See
        :func:`hacbo_jax.models.qwen3_hf.from_pretrained`.
        """
        from hacbo_jax.models.qwen3_hf import from_pretrained

        return from_pretrained(
            path_or_hub_id,
            model_cls=cls,
            dtype=dtype,
            param_dtype=param_dtype,
            remat=remat,
            scan_layers=scan_layers,
            attention_impl=attention_impl,
        )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes ``config.json`` and ``model.safetensors`` in Hugging Face's layout and names.

        See :func:`hacbo_jax.models.qwen3_hf.save_pretrained`.
        """
        from hacbo_jax.models.qwen3_hf import save_pretrained

        save_pretrained(self, directory)


# Hugging Face mapping helpers used to live here; they are re-exported from qwen3_hf on access
# (PEP 562) so ``from hacbo_jax.models.qwen3 import hf_name`` keeps working without an import cycle.
_HF_NAMES = ("hf_name", "hf_to_param", "param_to_hf", "param_to_hf_shape", "iter_hf_tensors")


def __getattr__(name: str):
    if name in _HF_NAMES:
        from hacbo_jax.models import qwen3_hf

        return getattr(qwen3_hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
