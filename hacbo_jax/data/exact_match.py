"""Exact match of GSM8K final answers, as the project defines it (docs/data.md, "Exact match").

Final answer of a text = the text after the LAST ``####``, or, when the text has no ``####``,
the last number in it. It is normalised by removing all whitespace and commas and then one
leading ``$``. Two answers match when the normalised strings are equal, or when both parse as
decimal numbers of equal value (``18`` == ``18.0`` == ``18.00``; compared with ``decimal.Decimal``,
so no float rounding). A text with neither ``####`` nor a number has no answer and matches nothing.

That is the ``gsm8k`` metric. The ``exact`` metric (:func:`normalize_text`) compares whole
texts: surrounding whitespace stripped, inner runs of whitespace collapsed to one space,
case-sensitive unless ``ignore_case`` (then compared case-folded), so ``"Paris"`` matches
``" Paris\n"`` but not ``"paris"`` nor ``"Paris."``.

The whole text after ``####`` counts: the caller cuts generations at EOS (``generate`` pads after
EOS, and decoding skips special tokens), so ``#### 72`` followed by more prose is NOT a match.
"""

from __future__ import annotations

import decimal
import re
from collections.abc import Sequence

ANSWER_MARKER = "####"
# A number as written in GSM8K text: optional sign and "$", digits with thousands commas, decimals.
_NUMBER = re.compile(r"-?\$?\d(?:[\d,]*\d)?(?:\.\d+)?")
_WHITESPACE_AND_COMMAS = re.compile(r"[\s,]+")
METRICS = ("gsm8k", "exact")


def normalize_answer(answer: str) -> str:
    """Removes whitespace and commas everywhere, then a single leading ``$``."""
    cleaned = _WHITESPACE_AND_COMMAS.sub("", answer)
    return cleaned[1:] if cleaned.startswith("$") else cleaned


def extract_final_answer(text: str) -> str | None:
    """The normalised final answer of ``text`` (model output or GSM8K reference), or None."""
    if ANSWER_MARKER in text:
        return normalize_answer(text.rsplit(ANSWER_MARKER, 1)[1])
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return normalize_answer(numbers[-1])


def _as_decimal(answer: str) -> decimal.Decimal | None:
    try:
        value = decimal.Decimal(answer)
    except decimal.InvalidOperation:
        return None
    return value if value.is_finite() else None


def answers_equal(predicted: str | None, reference: str | None) -> bool:
    """Equality of two already-normalised answers: same string, or same decimal value."""
    if predicted is None or reference is None:
        return False
    if predicted == reference:
        return True
    left, right = _as_decimal(predicted), _as_decimal(reference)
    return left is not None and right is not None and left == right


def normalize_text(text: str, *, ignore_case: bool = False) -> str:
    """The ``exact`` metric's normal form: stripped, whitespace runs collapsed to one space,
    case-folded when ``ignore_case``."""
    collapsed = " ".join(text.split())
    return collapsed.casefold() if ignore_case else collapsed


def is_exact_match(
    prediction: str, reference: str, *, metric: str = "gsm8k", ignore_case: bool = False
) -> bool:
    """Whether the model output ``prediction`` matches ``reference`` under ``metric``.

    ``gsm8k`` (default): the final answers match; ``reference`` may be a full GSM8K answer
    (``"...\\n#### 72"``) or a bare final answer such as ``"72"`` or ``"1/2"`` (used whole after
    normalisation, not searched for its last number). ``exact``: the :func:`normalize_text`
    forms are equal (``ignore_case`` only applies to ``exact``).
    """
    if metric == "exact":
        return normalize_text(prediction, ignore_case=ignore_case) == normalize_text(
            reference, ignore_case=ignore_case
        )
    if metric != "gsm8k":
        raise ValueError(f"metric={metric!r}; expected one of {METRICS}")
    if ANSWER_MARKER in reference:
        expected = extract_final_answer(reference)
    else:
        expected = normalize_answer(reference) or None
    return answers_equal(extract_final_answer(prediction), expected)


def exact_match_score(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    metric: str = "gsm8k",
    ignore_case: bool = False,
) -> float:
    """Fraction of ``predictions`` that match the paired reference (:func:`is_exact_match`)."""
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions ({len(predictions)}) and references ({len(references)}) must have equal length"
        )
    if not predictions:
        raise ValueError("exact_match_score needs at least one prediction")
    matches = (
        is_exact_match(p, r, metric=metric, ignore_case=ignore_case)
        for p, r in zip(predictions, references)
    )
    return sum(matches) / len(predictions)
