"""Exact match as defined in docs/data.md: last '####' (else last number), whitespace/commas/leading '$' removed,
string equality or equal decimal value."""

import pytest

from hacbo_jax.data.exact_match import (
    answers_equal,
    exact_match_score,
    extract_final_answer,
    is_exact_match,
    normalize_answer,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
        ("#### 1,000", "1000"),
        ("#### $18", "18"),
        ("#### $ 1,234.50", "1234.50"),
        ("####  -3 ", "-3"),
        ("first #### 5 then #### 7", "7"),  # the LAST marker counts
        ("#### 72\nQuestion: more text", "72Question:moretext"),  # everything after it counts
        ("####", ""),
        ("The answer is 42.", "42"),  # no marker: last number
        ("She has 3 apples and 1,250 pears", "1250"),
        ("It costs $5.50 in total", "5.50"),
        ("went from -4 to 9 degrees", "9"),
        ("temperature -4", "-4"),
        ("no digits at all", None),
        ("", None),
        ("18.", "18"),  # sentence full stop is not a decimal part
        ("#### 1/2", "1/2"),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_normalize_removes_only_one_leading_dollar():
    assert normalize_answer(" $ 1, 000 ") == "1000"
    assert normalize_answer("$$5") == "$5"
    assert normalize_answer("5$") == "5$"


@pytest.mark.parametrize(
    "predicted, reference, equal",
    [
        ("18", "18", True),
        ("18", "18.0", True),
        ("18.00", "18", True),
        ("0.5", ".5", True),
        ("-3", "-3.0", True),
        ("18", "19", False),
        ("18", "-18", False),
        ("1/2", "1/2", True),  # non-numeric: plain string equality
        ("1/2", "0.5", False),
        ("abc", "abc", True),
        ("", "0", False),
        (None, "5", False),
        ("5", None, False),
        (None, None, False),
        ("NaN", "NaN", True),  # equal strings
        ("1e1", "10", True),  # both decimals of equal value
    ],
)
def test_answers_equal(predicted, reference, equal):
    assert answers_equal(predicted, reference) is equal


@pytest.mark.parametrize(
    "prediction, reference, match",
    [
        (" 48/2 = <<48/2=24>>24\n#### 72", "...\n#### 72", True),
        ("#### 72.0", "#### 72", True),
        ("#### $1,000", "#### 1000", True),
        ("so the total is 1,000 dollars", "#### 1000", True),
        ("so the total is 999 dollars", "#### 1000", False),
        ("#### 7 then later 72", "#### 72", False),  # marker wins over the last number
        ("#### 72 apples", "#### 72", False),  # trailing words break string equality
        ("", "#### 0", False),
        ("#### 72", "72", True),  # a bare reference answer works too
        ("#### 1/2", "1/2", True),  # ... and is used whole, not searched for its last number
        ("#### 2", "1/2", False),
        ("#### 1,000", " $1,000 ", True),
        ("#### 5", "", False),
    ],
)
def test_is_exact_match(prediction, reference, match):
    assert is_exact_match(prediction, reference) is match


def test_exact_match_score_and_errors():
    assert exact_match_score(
        ["#### 1", "#### 2", "x"], ["#### 1", "#### 3", "#### 0"]
    ) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="equal length"):
        exact_match_score(["1"], [])
    with pytest.raises(ValueError, match="at least one"):
        exact_match_score([], [])
