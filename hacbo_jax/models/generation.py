"""Batched KV-cache decoding (greedy or temperature sampling) for left-padded prompts.

One jitted program per (model structure, prompt shape, budget): a prefill over the prompt fills
the key/value cache, then a ``lax.while_loop`` feeds one token per step and exits as soon as
every row has produced an end-of-sequence token or the budget is spent. Left padding keeps the
last prompt token of every row in the same column, so each step writes one cache slot for the
whole batch; RoPE positions count real tokens only (as transformers' ``generate`` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from hacbo_jax.models.qwen3 import Qwen3ForCausalLM, positions_from_mask

__all__ = ["generate"]


def generate(
    model: Qwen3ForCausalLM,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    temperature: float = 0.0,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Continues LEFT-padded prompts; returns int32[B, max_new_tokens].

    Args:
      model: the causal LM (its parameters are read, not modified).
      input_ids: int[B, T] prompts, left-padded (every row's last column is a real token).
      attention_mask: int/bool[B, T], 1 on prompt tokens, 0 on left pads.
      max_new_tokens: token budget per row.
      eos_token_id: one id or several; a row stops after emitting any of them (the EOS token is
        kept in the output).
      pad_token_id: written after a row's EOS and for steps skipped by the early exit.
      temperature: 0 for greedy argmax decoding; > 0 samples from softmax(logits / temperature).
      rng: PRNG key, required when temperature > 0.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError("temperature > 0 needs an rng key (jax.random.key(...))")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.asarray(attention_mask).astype(jnp.bool_)
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [B, T], got "
            f"{input_ids.shape} and {attention_mask.shape}"
        )
    eos = tuple(
        int(e) for e in (eos_token_id if isinstance(eos_token_id, Sequence) else (eos_token_id,))
    )
    if rng is None:
        rng = jax.random.key(0)
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        input_ids,
        attention_mask,
        rng,
        jnp.float32(max(temperature, 1e-6)),
        max_new_tokens=int(max_new_tokens),
        eos=eos,
        pad_token_id=int(pad_token_id),
        sample=temperature > 0,
    )


@partial(
    jax.jit,
    static_argnums=(0,),
    static_argnames=("max_new_tokens", "eos", "pad_token_id", "sample"),
)
def _generate(
    graphdef,
    state,
    input_ids,
    prompt_mask,
    rng,
    temperature,
    *,
    max_new_tokens,
    eos,
    pad_token_id,
    sample,
):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = input_ids.shape
    cache_len = prompt_len + max_new_tokens
    eos_ids = jnp.asarray(eos, jnp.int32)

    def pick(logits, key):
        if sample:
            return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    # Prefill: the prompt attends causally to itself (pads masked) and fills cache slots [0, T).
    slot_valid = jnp.zeros((batch, cache_len), jnp.bool_).at[:, :prompt_len].set(prompt_mask)
    causal = jnp.arange(cache_len)[None, :] <= jnp.arange(prompt_len)[:, None]  # [T, S]
    mask = causal[None, None] & slot_valid[:, None, None, :]
    cache = model.init_cache(batch, cache_len)
    logits, cache = model.forward_with_cache(
        input_ids, positions_from_mask(prompt_mask), mask, cache, 0, last_only=True
    )
    rng, key = jax.random.split(rng)
    token = pick(logits[:, -1], key)
    done = jnp.isin(token, eos_ids)
    out = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)
    next_pos = jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32)  # position of the first new token

    def cond(carry):
        step, _, _, done, _, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, token, cache, done, slot_valid, out, rng = carry
        slot = prompt_len + step - 1  # cache slot of the token being fed
        slot_valid = slot_valid.at[:, slot].set(True)
        mask = slot_valid[:, None, None, :]
        positions = (next_pos + step - 1)[:, None]
        logits, cache = model.forward_with_cache(token[:, None], positions, mask, cache, slot)
        rng, key = jax.random.split(rng)
        new = pick(logits[:, -1], key)
        new = jnp.where(done, pad_token_id, new)
        out = out.at[:, step].set(new)
        done = done | jnp.isin(new, eos_ids)
        return step + 1, new, cache, done, slot_valid, out, rng

    carry = (jnp.int32(1), token, cache, done, slot_valid, out, rng)
    out = jax.lax.while_loop(cond, body, carry)[5]
    return out
