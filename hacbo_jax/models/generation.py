"""Batched KV-cache decoding of left-padded prompts: greedy or sampled, with transformers' rules.

One jitted program per (model structure, batch size, bucketed prompt length, bucketed budget,
sampling settings; end tokens and pad id are traced): a prefill over the prompt fills the key/value cache, then a
``lax.while_loop`` feeds one token per step and exits as soon as every row has produced an end
token or the requested budget is spent. Left padding keeps the last prompt token of every row in
the same column, so each step writes one cache slot for the whole batch; RoPE positions count
real tokens only (as transformers' ``generate`` does).

Prompt lengths and budgets are rounded up to buckets (:func:`bucket_length`: powers of two up to
64, then multiples of 64) before tracing: the prompt gets extra left pads and the budget stays a
traced number, so calls whose shapes fall in the same buckets reuse one compiled program
(:func:`compiled_program_count` counts the programs traced so far).

Next-token choice follows transformers' ``generate`` (the reference): the repetition penalty is
applied to the raw logits, then, when sampling, temperature, top-k, top-p and min-p in that
order (:func:`process_logits`); greedy decoding takes the argmax of the penalised logits.
Defaults come from a :class:`GenerationConfig` (read from ``generation_config.json``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hacbo_jax.models.qwen3 import Qwen3ForCausalLM, positions_from_mask

__all__ = [
    "GenerationConfig",
    "bucket_length",
    "chat_prompt",
    "compiled_program_count",
    "generate",
    "process_logits",
]

GENERATION_CONFIG_NAME = "generation_config.json"

# Number of programs traced by _generate so far (each trace is one compilation).
_PROGRAMS_TRACED = 0


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _token_ids(value: int | Sequence[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (int, np.integer)):
        return (int(value),)
    return tuple(int(v) for v in value)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings with transformers' ``GenerationConfig`` names, defaults and meaning.

    The defaults are transformers' own (``GenerationConfig._get_default_generation_params``):
    greedy decoding, and when ``do_sample`` is set, temperature 1 with top-k 50. ``top_k`` 0 or
    None, ``top_p`` 1 and ``min_p`` None turn the corresponding filter off; ``repetition_penalty``
    1 turns the penalty off. ``eos_token_id`` holds every end token (an int or a list in the file;
    always a tuple here, so the config is hashable).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "eos_token_id", _token_ids(self.eos_token_id))
        if self.do_sample and not self.temperature > 0:
            raise ValueError(
                f"GenerationConfig.temperature must be > 0 when do_sample=True, got "
                f"{self.temperature} (use do_sample=False for greedy decoding)"
            )
        if self.top_k is not None and (
            not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0
        ):
            raise ValueError(f"GenerationConfig.top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"GenerationConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"GenerationConfig.min_p must be in [0, 1] or None, got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(
                f"GenerationConfig.repetition_penalty must be > 0, got {self.repetition_penalty}"
            )
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(
                f"GenerationConfig.max_new_tokens must be >= 1 or None, got {self.max_new_tokens}"
            )

    @classmethod
    def qwen3(cls) -> GenerationConfig:
        """Qwen3's published ``generation_config.json`` (Qwen/Qwen3-0.6B): T 0.6, top-p 0.95,
        top-k 20, sampling on, ending on ``<|im_end|>`` (151645) or ``<|endoftext|>`` (151643)."""
        return cls(
            do_sample=True,
            temperature=0.6,
            top_k=20,
            top_p=0.95,
            eos_token_id=(151645, 151643),
            pad_token_id=151643,
            bos_token_id=151643,
        )

    @classmethod
    def from_model_config(cls, config: Any) -> GenerationConfig:
        """Greedy defaults ending on the model config's ``eos_token_id`` (transformers does the
        same for a checkpoint without ``generation_config.json``)."""
        return cls(
            eos_token_id=_token_ids(getattr(config, "eos_token_id", None)),
            pad_token_id=getattr(config, "pad_token_id", None),
            bos_token_id=getattr(config, "bos_token_id", None),
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GenerationConfig:
        """From a ``generation_config.json`` dict: known keys are read (null means the default),
        the others (``transformers_version``, beam-search settings, ...) are ignored."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in fields and v is not None})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> GenerationConfig:
        """Reads ``generation_config.json`` (the file, or the checkpoint directory holding it)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, GENERATION_CONFIG_NAME)
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """The ``generation_config.json`` dict (transformers' key names; one end token as an int,
        several as a list, as transformers writes them)."""
        d = dataclasses.asdict(self)
        eos = d.pop("eos_token_id")
        if eos:
            d["eos_token_id"] = eos[0] if len(eos) == 1 else list(eos)
        return {k: v for k, v in d.items() if v is not None}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes ``generation_config.json`` into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, GENERATION_CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def replace(self, **overrides: Any) -> GenerationConfig:
        """A copy with the given fields changed (``None`` values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


def bucket_length(n: int) -> int:
    """The padded size used for a prompt length or token budget ``n``: the next power of two up
    to 64 (at least 8), then the next multiple of 64 (so 9 -> 16, 100 -> 128, 200 -> 256,
    300 -> 320)."""
    if n < 1:
        raise ValueError(f"length must be >= 1, got {n}")
    if n <= 64:
        return max(8, 1 << (n - 1).bit_length())
    return -(-n // 64) * 64


def compiled_program_count() -> int:
    """How many generation programs have been traced (= compiled) in this process so far."""
    return _PROGRAMS_TRACED


def chat_prompt(
    tokenizer,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> str:
    """The prompt text of a conversation, rendered with the tokenizer's own chat template.

    ``messages`` are ``{"role": ..., "content": ...}`` dicts; with ``add_generation_prompt`` the
    text ends with the opening of the assistant's turn, ready for :func:`generate`. Extra keyword
    arguments reach the template (Qwen3's takes ``enable_thinking=False`` to skip the thinking
    block). Tokenise the result with ``add_special_tokens=False``: the template already wrote
    the special tokens.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat_template")
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **template_kwargs,
    )


# --------------------------------------------------------------------------------------------
# Logits processing
# --------------------------------------------------------------------------------------------


def process_logits(
    logits: jax.Array,
    generated: jax.Array | None = None,
    generated_mask: jax.Array | None = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
) -> jax.Array:
    """Next-token logits float32[B, V] after transformers' processors, in generate's order.

    1. repetition penalty (``RepetitionPenaltyLogitsProcessor``): every token id that occurs in
       ``generated`` (where ``generated_mask`` is true) gets ``l / p`` if ``l > 0`` else ``l * p``;
    2. temperature (``TemperatureLogitsWarper``): ``l / T``;
    3. top-k (``TopKLogitsWarper``): logits below the k-th largest become -inf (ties kept);
    4. top-p (``TopPLogitsWarper``): sorting ascending, tokens whose cumulative probability is
       ``<= 1 - top_p`` become -inf (the most likely token always stays);
    5. min-p (``MinPLogitsWarper``): tokens with ``prob < min_p * max prob`` become -inf.

    Steps 2-5 are the sampling warpers; greedy decoding uses step 1 only. Unlike transformers,
    masked-out entries of ``generated`` (prompt pads) are not penalised.

    Args:
      logits: float[B, V].
      generated: int[B, L] the tokens seen so far (prompt and continuation); needed when
        ``repetition_penalty != 1``.
      generated_mask: bool[B, L], true on real tokens (default: all).
    """
    logits = jnp.asarray(logits, jnp.float32)
    batch, vocab = logits.shape
    rows = jnp.arange(batch)[:, None]
    if repetition_penalty != 1.0:
        if generated is None:
            raise ValueError("repetition_penalty != 1 needs the generated token ids")
        generated = jnp.asarray(generated, jnp.int32)
        if generated_mask is not None:
            generated = jnp.where(jnp.asarray(generated_mask, jnp.bool_), generated, vocab)
        seen = jnp.zeros((batch, vocab), jnp.bool_).at[rows, generated].set(True, mode="drop")
        penalised = jnp.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
        logits = jnp.where(seen, penalised, logits)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, min(int(top_k), vocab))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # ascending
        cumulative = jnp.cumsum(
            jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1), axis=-1
        )
        remove_sorted = (cumulative <= 1.0 - top_p).at[:, -1].set(False)
        remove = jnp.zeros((batch, vocab), jnp.bool_).at[rows, order].set(remove_sorted)
        logits = jnp.where(remove, -jnp.inf, logits)
    if min_p is not None:
        probs = jax.nn.softmax(logits, axis=-1)
        # The most likely token has probs == max >= min_p * max, so at least one token stays.
        logits = jnp.where(probs < min_p * probs.max(axis=-1, keepdims=True), -jnp.inf, logits)
    return logits


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _check_prompts(input_ids: np.ndarray, mask: np.ndarray, vocab_size: int) -> None:
    if input_ids.ndim != 2 or mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [B, T], got "
            f"{input_ids.shape} and {mask.shape}"
        )
    # Left padding: within a row the mask never goes from 1 back to 0, and the last column is
    # a real token (the one the first new token follows).
    not_left = (np.diff(mask.astype(np.int8), axis=-1) < 0).any(axis=-1) | ~mask[:, -1]
    if not_left.any():
        rows = np.flatnonzero(not_left).tolist()
        raise ValueError(
            f"prompts must be LEFT-padded (pads first, the last column a real token); rows "
            f"{rows[:8]} are right-padded or empty (tokenizer.padding_side = 'left' fixes this)"
        )
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"token ids must be in [0, {vocab_size - 1}] (the model's vocab_size is "
            f"{vocab_size}); got ids from {low} to {high}"
        )


def generate(
    model: Qwen3ForCausalLM,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    max_new_tokens: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generation_config: GenerationConfig | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Continues LEFT-padded prompts; returns int32[B, max_new_tokens].

    Settings are resolved as in transformers' ``generate``: a keyword given here wins, then
    ``generation_config``, then the model's ``generation_config`` attribute (set when a checkpoint
    with ``generation_config.json`` is loaded), then greedy defaults ending on the model config's
    ``eos_token_id``. For backward compatibility ``temperature=0`` means greedy and a positive
    ``temperature`` without ``do_sample`` means sampling.

    Args:
      model: the causal LM (its parameters are read, not modified).
      input_ids: int[B, T] prompts, left-padded; every id must be in [0, vocab_size).
      attention_mask: int/bool[B, T], 1 on prompt tokens, 0 on the left pads.
      max_new_tokens: token budget per row.
      eos_token_id: one end token or several; a row stops after emitting ANY of them (the end
        token is kept in the output). Default: every end token of the generation config
        (Qwen3: ``<|im_end|>`` and ``<|endoftext|>``).
      pad_token_id: written after a row's end token and for steps skipped by the early exit
        (default: the config's pad, else its first end token).
      generation_config, do_sample, temperature, top_k, top_p, min_p, repetition_penalty: see
        :class:`GenerationConfig` and :func:`process_logits`.
      rng: PRNG key, required when sampling.

    Raises:
      ValueError: right-padded or empty prompt rows, token ids outside the vocabulary, or a
        missing budget, pad id or rng.
    """
    config = generation_config or getattr(model, "generation_config", None)
    if config is None:
        config = GenerationConfig.from_model_config(model.config)
    if temperature is not None and do_sample is None:
        do_sample = temperature > 0
    if temperature == 0:
        temperature = None  # greedy: the temperature is not used
    config = config.replace(
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        max_new_tokens=max_new_tokens,
    )
    if config.max_new_tokens is None:
        raise ValueError("max_new_tokens must be given (here or in the generation config)")
    eos = config.eos_token_id if eos_token_id is None else _token_ids(eos_token_id)
    if pad_token_id is None:
        pad_token_id = (
            config.pad_token_id if config.pad_token_id is not None else eos[0] if eos else None
        )
    if pad_token_id is None:
        raise ValueError("pad_token_id must be given: neither the config nor eos_token_id sets one")
    if config.do_sample and rng is None:
        raise ValueError(
            "sampling (do_sample / temperature > 0) needs an rng key (jax.random.key(...))"
        )
    vocab_size = model.config.vocab_size
    for name, ids in (("eos_token_id", eos), ("pad_token_id", (pad_token_id,))):
        if any(not 0 <= i < vocab_size for i in ids):
            raise ValueError(f"{name}={ids} outside the vocabulary [0, {vocab_size - 1}]")

    ids_np = np.asarray(input_ids).astype(np.int64)
    mask_np = np.asarray(attention_mask).astype(bool)
    _check_prompts(ids_np, mask_np, vocab_size)
    prompt_len = ids_np.shape[1]
    extra = bucket_length(prompt_len) - prompt_len  # more left pads: same result, shared program
    ids_np = np.pad(ids_np, ((0, 0), (extra, 0)), constant_values=pad_token_id)
    mask_np = np.pad(mask_np, ((0, 0), (extra, 0)), constant_values=False)

    budget = int(config.max_new_tokens)
    sampling = (
        (config.do_sample, config.temperature, config.top_k, config.top_p, config.min_p)
        if config.do_sample
        else (False, 1.0, None, 1.0, None)
    )
    graphdef, state = nnx.split(model)
    out = _generate(
        graphdef,
        state,
        jnp.asarray(ids_np, jnp.int32),
        jnp.asarray(mask_np),
        jax.random.key(0) if rng is None else rng,
        jnp.int32(budget),
        # End tokens padded with -1 (never produced) to a multiple of 8: traced, not static, so
        # they change no program.
        jnp.asarray(eos + (-1,) * (max(8, -(-len(eos) // 8) * 8) - len(eos)), jnp.int32),
        jnp.int32(pad_token_id),
        buffer_len=bucket_length(budget),
        sampling=sampling,
        repetition_penalty=float(config.repetition_penalty),
    )
    return out[:, :budget]


@partial(
    jax.jit,
    static_argnums=(0,),
    static_argnames=("buffer_len", "sampling", "repetition_penalty"),
)
def _generate(
    graphdef,
    state,
    input_ids,
    prompt_mask,
    rng,
    budget,
    eos_ids,
    pad_token_id,
    *,
    buffer_len,
    sampling,
    repetition_penalty,
):
    global _PROGRAMS_TRACED
    _PROGRAMS_TRACED += 1  # runs once per trace, i.e. once per compiled program
    model = nnx.merge(graphdef, state)
    batch, prompt_len = input_ids.shape
    cache_len = prompt_len + buffer_len
    do_sample, temperature, top_k, top_p, min_p = sampling

    def pick(logits, seen_ids, seen_mask, key):
        logits = process_logits(
            logits,
            seen_ids,
            seen_mask,
            repetition_penalty=repetition_penalty,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
        )
        if do_sample:
            return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    # Every token so far (prompt, then continuation): the repetition penalty reads it.
    seen_ids = jnp.concatenate(
        [input_ids, jnp.full((batch, buffer_len), pad_token_id, jnp.int32)], 1
    )
    seen_mask = jnp.zeros((batch, cache_len), jnp.bool_).at[:, :prompt_len].set(prompt_mask)

    # Prefill: the prompt attends causally to itself (pads masked) and fills cache slots [0, T).
    slot_valid = seen_mask
    causal = jnp.arange(cache_len)[None, :] <= jnp.arange(prompt_len)[:, None]  # [T, S]
    mask = causal[None, None] & slot_valid[:, None, None, :]
    cache = model.init_cache(batch, cache_len)
    logits, cache = model.forward_with_cache(
        input_ids, positions_from_mask(prompt_mask), mask, cache, 0, last_only=True
    )
    rng, key = jax.random.split(rng)
    token = pick(logits[:, -1], seen_ids, seen_mask, key)
    done = jnp.isin(token, eos_ids)
    out = jnp.full((batch, buffer_len), pad_token_id, jnp.int32).at[:, 0].set(token)
    next_pos = jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32)  # position of the first new token

    def cond(carry):
        step, _, _, done, _, _, _, _ = carry
        return (step < budget) & ~jnp.all(done)

    def body(carry):
        step, token, cache, done, slot_valid, seen_ids, out, rng = carry
        slot = prompt_len + step - 1  # cache slot of the token being fed
        slot_valid = slot_valid.at[:, slot].set(True)
        seen_ids = seen_ids.at[:, slot].set(token)
        mask = slot_valid[:, None, None, :]
        positions = (next_pos + step - 1)[:, None]
        logits, cache = model.forward_with_cache(token[:, None], positions, mask, cache, slot)
        rng, key = jax.random.split(rng)
        new = pick(logits[:, -1], seen_ids, slot_valid, key)
        new = jnp.where(done, pad_token_id, new)
        out = out.at[:, step].set(new)
        done = done | jnp.isin(new, eos_ids)
        return step + 1, new, cache, done, slot_valid, seen_ids, out, rng

    carry = (jnp.int32(1), token, cache, done, slot_valid, seen_ids, out, rng)
    return jax.lax.while_loop(cond, body, carry)[6]
