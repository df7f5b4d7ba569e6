"""Exact match of GSM8K final answers, as fixed by the project spec ("Exact match").

Final answer of a text = the text after the LAST ``####``, or, when the text has no ``####``,
the last number in it. It is normalised by removing all whitespace and commas and then one
leading ``$``. Two answers match when the normalised strings are equal, or when both parse as
decimal numbers of equal value (``18`` == ``18.0`` == ``18.00``; compared with ``decimal.Decimal``,
so no float rounding). A text with neither ``####`` nor a number has no answer and matches nothing.

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


def is_exact_match(prediction: str, reference: str) -> bool:
    """Whether the model output ``prediction`` has the final answer of ``reference``.

    ``reference`` may be a full GSM8K answer (``"...\\n#### 72"``) or a bare final answer such as
    ``"72"`` or ``"1/2"`` (used whole after normalisation, not searched for its last number).
    """
    if ANSWER_MARKER in reference:
        expected = extract_final_answer(reference)
    else:
        expected = normalize_answer(reference) or None
    return answers_equal(extract_final_answer(prediction), expected)


def exact_match_score(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of ``predictions`` whose final answer matches the paired reference."""
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions ({len(predictions)}) and references ({len(references)}) must have equal length"
        )
    if not predictions:
        raise ValueError("exact_match_score needs at least one prediction")
    return sum(map(is_exact_match, predictions, references)) / len(predictions)
