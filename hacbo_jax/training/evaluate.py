"""Exact-match evaluation by batched, jitted greedy decoding.

Prompts are left-padded to one fixed length for the whole run and batches have one fixed size,
so every call (per-epoch evaluation, micro-dev refresh scoring) reuses one compiled decoder.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from hacbo_jax.models.generation import generate
from hacbo_jax.training.data import Example, format_prompt, prompt_batches, token_ids
from hacbo_jax.training.exact_match import is_exact_match


class EvalResult(NamedTuple):
    exact_match: float  # fraction in [0, 1]
    num_examples: int
    predictions: list[str]  # decoded model outputs, one per example
    correct: np.ndarray  # bool [num_examples]


def prompt_length_for(questions: Sequence[str], tokenizer, *, multiple: int = 16) -> int:
    """The longest tokenised prompt among ``questions``, rounded up to ``multiple``."""
    lengths = [len(ids) for ids in token_ids(tokenizer, [format_prompt(q) for q in questions])]
    longest = max(lengths, default=1)
    return -(-longest // multiple) * multiple


def greedy_completions(
    model,
    tokenizer,
    questions: Sequence[str],
    *,
    batch_size: int,
    prompt_len: int,
    max_new_tokens: int,
) -> list[str]:
    """Greedy continuations of ``format_prompt(question)`` for every question, decoded."""
    completions: list[str] = []
    for batch in prompt_batches(questions, tokenizer, batch_size=batch_size, prompt_len=prompt_len):
        tokens = generate(
            model,
            batch.input_ids,
            batch.attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
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
) -> EvalResult:
    """Exact match (spec normalisation) of greedy answers against the examples' answers."""
    predictions = greedy_completions(
        model,
        tokenizer,
        [e.question for e in examples],
        batch_size=batch_size,
        prompt_len=prompt_len,
        max_new_tokens=max_new_tokens,
    )
    correct = np.array(
        [is_exact_match(p, e.answer) for p, e in zip(predictions, examples)],
        dtype=bool,
    )
    score = float(correct.mean()) if len(examples) else 0.0
    return EvalResult(score, len(examples), predictions, correct)
