"""Training data that pulls against the target: a seeded share of examples with wrong answers.

A fine-tuning set in which part of the data contradicts the task the model is evaluated on is
the regime where HACBO's agreement test is meant to act: the micro-dev pool and the evaluation
stay clean, so the training gradient's sign agreement with the dev gradient falls in the blocks
that the wrong answers pull most. :func:`with_wrong_answers` makes such a set from a clean one
(GSM8K-format worked answers ending in ``#### n``): a chosen share of examples get a final
answer that is a different integer, written consistently in the last worked line and after
``####``, so that the wrong answer is as learnable as a right one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from hacbo_jax.data.gsm8k import Example

__all__ = ["with_wrong_answers"]

_FINAL = re.compile(r"####\s*(-?\d+)\s*$")


def _wrong_value(value: int, rng: np.random.Generator) -> int:
    """A different non-negative integer near ``value``: value +- k, k uniform in 1..max(1,
    value // 2) (a plausible slip, not a random number); never ``value`` itself."""
    span = max(1, abs(value) // 2)
    k = int(rng.integers(1, span + 1))
    down = value - k
    return down if (rng.random() < 0.5 and down >= 0) else value + k


def _with_final(answer: str, old: int, new: int) -> str:
    """``answer`` with its final ``#### old`` set to ``new``, and the result ``old`` of the last
    worked line before it (``<<expr=old>>old``, and a trailing ``old``) set to ``new`` too."""
    lines = answer.rstrip("\n").split("\n")
    lines[-1] = _FINAL.sub(f"#### {new}", lines[-1])
    if len(lines) >= 2:
        last = lines[-2]
        last = re.sub(rf"=\s*{old}>>\s*{old}\b", f"={new}>>{new}", last)
        lines[-2] = last
    return "\n".join(lines)


def with_wrong_answers(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], np.ndarray]:
    """(examples with ``round(fraction * n)`` wrong answers, bool[n] marking them).

    The corrupted examples are drawn without replacement with ``seed``; each gets
    :func:`_wrong_value` of its final answer, consistently in its last worked line (see the
    module docstring). Examples whose answer does not end in ``#### <integer>`` are never
    chosen (ValueError if too few remain). ``fraction = 0`` returns the examples unchanged.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    n = len(examples)
    wanted = int(round(fraction * n))
    marked = np.zeros(n, bool)
    if wanted == 0:
        return list(examples), marked
    finals = [_FINAL.search(e.answer.rstrip()) for e in examples]
    eligible = np.flatnonzero([m is not None for m in finals])
    if len(eligible) < wanted:
        raise ValueError(
            f"{wanted} wrong answers asked ({fraction:g} of {n}), but only {len(eligible)} "
            "examples end in '#### <integer>'"
        )
    rng = np.random.default_rng(seed)
    chosen = rng.choice(eligible, size=wanted, replace=False)
    marked[chosen] = True
    out = list(examples)
    for i in np.sort(chosen):
        old = int(finals[i].group(1))
        new = _wrong_value(old, rng)
        out[i] = examples[i]._replace(answer=_with_final(examples[i].answer, old, new))
    return out, marked
