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
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "qwen3_labels",
    "QWEN3_LABEL_RULES",
    "positions_from_mask",
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

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum(self.einsum, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


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
    """cos/sin tables [B, T, head_dim] with angles ``pos * inv_freq`` in float32
    (:func:`rope_inv_freq`; ``scaling`` as in :attr:`Qwen3Config.rope_scaling`)."""
    inv_freq = jnp.asarray(
        rope_inv_freq(head_dim, theta, None if scaling is None else dict(scaling))
    )
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates pairs (i, i + H/2) of x[B, T, N, H]: ``x cos + rotate_half(x) sin``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class Qwen3Attention(nnx.Module):
    """Grouped-query self-attention with per-head q/k RMSNorm and RoPE."""

    def __init__(self, config: Qwen3Config, *, dtype, param_dtype, rngs: nnx.Rngs):
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

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        q, k = self.q_proj(x), self.k_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = self.v_proj(x)
        if cache is not None:
            # Left-padded batches write all rows at the same slot, so one dynamic slice suffices.
            k = jax.lax.dynamic_update_slice(
                cache[0], k.astype(cache[0].dtype), (0, cache_index, 0, 0)
            )
            v = jax.lax.dynamic_update_slice(
                cache[1], v.astype(cache[1].dtype), (0, cache_index, 0, 0)
            )
            cache = (k, v)
        # jax.nn.dot_product_attention groups query heads as [K, N/K] (repeat, not tile) and
        # takes the softmax in float32.
        out = jax.nn.dot_product_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, scale=self.scale
        )
        return self.o_proj(out), cache


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

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nnx.Module):
    def __init__(self, config: Qwen3Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.self_attn = Qwen3Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.mlp = Qwen3MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache


def _remat_layer(layer: Qwen3DecoderLayer, x, cos, sin, mask):
    return layer(x, cos, sin, mask)[0]


class Qwen3Model(nnx.Module):
    """Embeddings, decoder stack and final norm (HF's ``model.*`` sub-tree)."""

    def __init__(self, config: Qwen3Config, *, dtype, param_dtype, remat: bool, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(
            config.vocab_size,
            config.hidden_size,
            std=config.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.layers = nnx.List(
            [
                Qwen3DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.remat = remat
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.rope_scaling = config.rope_scaling

    def __call__(
        self, input_ids, positions, mask, cache: KVCache | None = None, cache_index=None
    ) -> tuple[jax.Array, KVCache | None]:
        x = self.embed_tokens(input_ids)
        cos, sin = rope_tables(positions, self.head_dim, self.rope_theta, self.rope_scaling)
        new_cache = []
        for i, layer in enumerate(self.layers):
            if cache is None and self.remat:
                x = nnx.remat(_remat_layer)(layer, x, cos, sin, mask)
            else:
                x, layer_cache = layer(
                    x, cos, sin, mask, None if cache is None else cache[i], cache_index
                )
                new_cache.append(layer_cache)
        return self.norm(x), (None if cache is None else tuple(new_cache))


# --------------------------------------------------------------------------------------------
# Causal LM
# --------------------------------------------------------------------------------------------


class Qwen3ForCausalLM(nnx.Module):
    """Qwen3 causal language model (``transformers.Qwen3ForCausalLM`` in Flax NNX).

    Args:
      config: the architecture.
      dtype: compute dtype (activations and matmuls); logits are returned in float32.
      param_dtype: storage dtype of the parameters (e.g. float32 master weights with bf16 compute).
      remat: rematerialise each decoder layer in the backward pass (``nnx.remat``).
      rngs: initialisation randomness (normal(0, initializer_range) weights, unit norms).
    """

    def __init__(
        self,
        config: Qwen3Config,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs | None = None,
    ):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config = config
        self.dtype = dtype
        self.model = Qwen3Model(
            config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs
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

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Logits float32[B, T, V] for input_ids int[B, T].

        ``attention_mask`` (1 = token, 0 = pad; left or right padding) masks pad keys and sets
        positions to the count of real tokens before each one. Outputs at pad positions are
        meaningless.
        """
        return self.lm_logits(self.hidden_states(input_ids, attention_mask))

    def hidden_states(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """Final-norm hidden states [B, T, D] in the compute dtype (``lm_logits`` maps them).

        Lets a loss compute the [T, V] logits chunk by chunk instead of all at once.
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.bool_)
        valid = attention_mask.astype(jnp.bool_)
        t = input_ids.shape[1]
        causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
        mask = causal[None, None] & valid[:, None, None, :]
        h, _ = self.model(input_ids, positions_from_mask(valid), mask)
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
          cache: per-layer (keys, values), each [B, S, K, H]; the new keys/values are written at
            slots ``cache_index .. cache_index + T``.
          last_only: compute logits for the last position only (prefill needs no more).
        Returns: (logits float32[B, T or 1, V], updated cache or None).
        """
        h, cache = self.model(input_ids, positions, mask, cache, cache_index)
        if last_only:
            h = h[:, -1:]
        return self.lm_logits(h), cache

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """Zeroed key/value cache, [B, max_length, K, H] per layer in the compute dtype."""
        c = self.config
        shape = (batch_size, max_length, c.num_key_value_heads, c.head_dim)
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
        remat: bool = False,
    ) -> Qwen3ForCausalLM:
        """Loads a Hugging Face Qwen3 checkpoint (local directory, or a hub id when online).

        See :func:`hacbo_jax.models.qwen3_hf.from_pretrained`.
        """
        from hacbo_jax.models.qwen3_hf import from_pretrained

        return from_pretrained(
            path_or_hub_id, model_cls=cls, dtype=dtype, param_dtype=param_dtype, remat=remat
        )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes ``config.json`` and ``model.safetensors`` in Hugging Face's layout and names.

        See :func:`hacbo_jax.models.qwen3_hf.save_pretrained`.
        """
        from hacbo_jax.models.qwen3_hf import save_pretrained

        save_pretrained(self, directory)


# --------------------------------------------------------------------------------------------
# HACBO labels
# --------------------------------------------------------------------------------------------

# (regex searched in the "/"-joined parameter path, label template) pairs for label_by_rules.
QWEN3_LABEL_RULES = (
    (r"(?:^|/)layers/(\d+)/self_attn/(?:q_proj|k_proj|v_proj)/", r"\1/attn_qkv"),
    (r"(?:^|/)layers/(\d+)/self_attn/o_proj/", r"\1/attn_out"),
    (r"(?:^|/)layers/(\d+)/mlp/(?:gate_proj|up_proj|down_proj)/", r"\1/mlp"),
    (
        r"(?:^|/)layers/(\d+)/(?:input_layernorm|post_attention_layernorm|self_attn/q_norm|"
        r"self_attn/k_norm)/",
        r"\1/ln",
    ),
)


def qwen3_labels(params) -> Any:
    """HACBO label tree for Qwen3 parameters: ``"{layer}/{attn_qkv|attn_out|mlp|ln}"``.

    Sub-modules follow the spec table (shared/spec/controllers.md): attn_qkv = q/k/v_proj,
    attn_out = o_proj, mlp = gate/up/down_proj, ln = input/post_attention layernorm and q/k_norm.
    Embeddings, the final norm and an untied lm_head are ``"other"`` (not controlled).
    ``params`` may be an ``nnx.State`` (e.g. from ``nnx.split(model, nnx.Param, ...)``) or a
    pure nested dict (``nnx.to_pure_dict``); the result has the same tree structure with a
    string at every leaf.
    """
    from hacbo_jax.controllers import label_by_rules

    return label_by_rules(
        params, [(pattern, label) for pattern, label in QWEN3_LABEL_RULES], default="other"
    )


# Hugging Face mapping helpers used to live here; they are re-exported from qwen3_hf on access
# (PEP 562) so ``from hacbo_jax.models.qwen3 import hf_name`` keeps working without an import cycle.
_HF_NAMES = ("hf_name", "hf_to_param", "param_to_hf", "param_to_hf_shape", "iter_hf_tensors")


def __getattr__(name: str):
    if name in _HF_NAMES:
        from hacbo_jax.models import qwen3_hf

        return getattr(qwen3_hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
