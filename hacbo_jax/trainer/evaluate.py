"""Evaluation: exact match by batched, jitted greedy decoding, and teacher-forced loss.

Prompts are left-padded to one fixed length for the whole run and batches have one fixed size,
so every call (per-epoch evaluation, micro-dev refresh scoring) reuses one compiled decoder
(:func:`hacbo_jax.models.generation.compiled_program_count` counts the programs; the training
loop logs how many each evaluation compiled).

Decoding is greedy and stops on every end token (:func:`end_token_ids`): those of the model's
generation config (``generation_config.json``), those of Qwen3's published generation config
when the shipped Qwen3 tokenizer is used (``<|im_end|>`` 151645 AND ``<|endoftext|>`` 151643: a
checkpoint whose config names only one of them still stops on both), and the tokenizer's EOS
(the token training appends). Tokens after a row's end token are padding and never reach the scorer.

The evaluation loss is the training loss on the evaluation examples: next-token
cross-entropy over the trained tokens (answer + EOS), summed over all examples and divided by
their number of trained tokens (a token-weighted mean, as in training).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hacbo_jax.assets import ASSETS_DIR
from hacbo_jax.models.generation import GenerationConfig, generate
from hacbo_jax.data.gsm8k import Example, prompt_batches, prompt_token_ids, tokenize_sft
from hacbo_jax.data.exact_match import is_exact_match

SHIPPED_QWEN3_TOKENIZER = ASSETS_DIR / "qwen3-tokenizer"


class EvalResult(NamedTuple):
    exact_match: float  # fraction in [0, 1] under the metric
    num_examples: int
    predictions: list[str]  # decoded model outputs, one per example
    correct: np.ndarray  # bool [num_examples]


def is_shipped_qwen3_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` was loaded from ``hacbo_jax/assets/qwen3-tokenizer``."""
    name = getattr(tokenizer, "name_or_path", None)
    if not name:
        return False
    try:
        return Path(name).resolve() == SHIPPED_QWEN3_TOKENIZER.resolve()
    except OSError:
        return False


def end_token_ids(model, tokenizer) -> tuple[int, ...]:
    """Every token that ends a generation (see the module docstring), in a fixed order: the
    model's generation-config end tokens (``model.generation_config``, else the model config's
    ``eos_token_id``), then Qwen3's (``GenerationConfig.qwen3()``: 151645, 151643) when the
    shipped Qwen3 tokenizer is used, then the tokenizer's EOS; each once."""
    config = getattr(model, "generation_config", None)
    if config is None:
        config = GenerationConfig.from_model_config(model.config)
    ends = list(config.eos_token_id)
    if is_shipped_qwen3_tokenizer(tokenizer):
        ends += GenerationConfig.qwen3().eos_token_id
    if tokenizer.eos_token_id is not None:
        ends.append(int(tokenizer.eos_token_id))
    return tuple(dict.fromkeys(int(t) for t in ends))


def prompt_length_for(items: Sequence[str | Example], tokenizer, *, multiple: int = 16) -> int:
    """The longest tokenised prompt among ``items`` (GSM8K questions or examples), rounded up
    to ``multiple``."""
    longest = max((len(ids) for ids in prompt_token_ids(items, tokenizer)), default=1)
    return -(-longest // multiple) * multiple


def greedy_completions(
    model,
    tokenizer,
    questions: Sequence[str | Example],
    *,
    batch_size: int,
    prompt_len: int,
    max_new_tokens: int,
    end_tokens: Sequence[int] | None = None,
) -> list[str]:
    """Greedy continuations of every prompt (:func:`hacbo_jax.data.gsm8k.prompt_token_ids`),
    decoded without special tokens; each row stops at the first of ``end_tokens`` (default
    :func:`end_token_ids`)."""
    ends = tuple(end_tokens) if end_tokens is not None else end_token_ids(model, tokenizer)
    # Greedy, whatever the checkpoint's generation_config.json asks for (Qwen3's samples).
    config = GenerationConfig(eos_token_id=ends, pad_token_id=tokenizer.pad_token_id)
    completions: list[str] = []
    for batch in prompt_batches(questions, tokenizer, batch_size=batch_size, prompt_len=prompt_len):
        tokens = generate(
            model,
            batch.input_ids,
            batch.attention_mask,
            max_new_tokens=max_new_tokens,
            generation_config=config,
        )
        tokens = np.asarray(tokens)[: batch.num_valid]
        completions.extend(tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True))
    return completions


def evaluate_exact_match(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int,
    prompt_len: int,
    max_new_tokens: int,
    metric: str = "gsm8k",
    ignore_case: bool = False,
    end_tokens: Sequence[int] | None = None,
) -> EvalResult:
    """Greedy answers scored against the examples' answers with ``metric``
    (:func:`hacbo_jax.data.exact_match.is_exact_match`)."""
    predictions = greedy_completions(
        model,
        tokenizer,
        list(examples),
        batch_size=batch_size,
        prompt_len=prompt_len,
        max_new_tokens=max_new_tokens,
        end_tokens=end_tokens,
    )
    correct = np.array(
        [
            is_exact_match(p, e.answer, metric=metric, ignore_case=ignore_case)
            for p, e in zip(predictions, examples)
        ],
        dtype=bool,
    )
    score = float(correct.mean()) if len(examples) else 0.0
    return EvalResult(score, len(examples), predictions, correct)


def make_eval_loss(loss_fn, arrays, *, batch_size: int, frozen: Any = None):
    """``eval_loss(params) -> float``: the token-weighted mean of ``loss_fn`` (summed NLL,
    token count: :func:`hacbo_jax.trainer.step.make_loss_fn`) over the tokenised evaluation
    ``arrays`` (:class:`hacbo_jax.data.gsm8k.SFTArrays`), in batches of ``batch_size``
    (the last one padded with rows of zero loss weight, so one program serves every batch).
    ``frozen``: the model's frozen state, given to ``loss_fn`` as its ``frozen`` keyword and to
    the compiled program as an argument (LoRA's base model would otherwise be a constant of it)."""
    from hacbo_jax.trainer.step import Batch

    n = len(arrays)
    if n == 0:
        return lambda params: float("nan")
    rows = -(-n // batch_size) * batch_size
    index = np.minimum(np.arange(rows), n - 1)
    weight = (np.arange(rows) < n).astype(np.float32)[:, None]
    taken = arrays.take(index)
    taken["loss_mask"] = taken["loss_mask"] * weight
    batches = [
        Batch(*(jnp.asarray(taken[k][s : s + batch_size]) for k in Batch._fields))
        for s in range(0, rows, batch_size)
    ]
    if frozen is None:
        step = jax.jit(loss_fn)
    else:
        with_frozen = jax.jit(lambda state, params, batch: loss_fn(params, batch, frozen=state))
        step = lambda params, batch: with_frozen(frozen, params, batch)

    def eval_loss(params) -> float:
        total, count = 0.0, 0.0
        for batch in batches:
            nll, tokens = step(params, batch)
            total, count = total + float(nll), count + float(tokens)
        return total / count if count else float("nan")

    return eval_loss


def eval_arrays(examples: Sequence[Example], tokenizer, max_len: int):
    """The evaluation examples tokenised as for training (for :func:`make_eval_loss`)."""
    return tokenize_sft(list(examples), tokenizer, max_len)
