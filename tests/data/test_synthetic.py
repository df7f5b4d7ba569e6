"""Synthetic GSM8K-format problems: format, arithmetic correctness, knobs, determinism, disjoint streams."""

import re

import numpy as np
import pytest

from hacbo_jax.data.exact_match import extract_final_answer
from hacbo_jax.data.synthetic import (
    PRESETS,
    SyntheticConfig,
    SyntheticTask,
    generate_problems,
    question_bucket,
)

_ANNOTATION = re.compile(r"<<(\d+)([+\-*])(\d+)=(\d+)>>(\d+)")


def check_problem(example, config):
    lines = example.answer.split("\n")
    assert lines[-1].startswith("#### ")
    steps = lines[:-1]
    assert config.min_steps <= len(steps) <= config.max_steps
    previous = None
    for line in steps:
        ((left, op, right, result, shown),) = _ANNOTATION.findall(line)
        left, right, result = int(left), int(right), int(result)
        assert result == {"+": left + right, "-": left - right, "*": left * right}[op]
        assert shown == str(result) and op in config.operations
        assert 1 <= result <= config.max_value
        assert f"{left} {op} {right} = <<" in line
        if op == "*":
            assert 2 <= right <= config.max_factor
        previous = result
    assert extract_final_answer(example.answer) == str(previous)
    assert example.question.endswith("?") and "####" not in example.question


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_generate_valid_gsm8k_format(name):
    config = PRESETS[name]
    for example in SyntheticTask(name).examples("train", 300):
        check_problem(example, config)


def test_knobs_are_respected():
    config = SyntheticConfig(
        min_steps=3,
        max_steps=3,
        max_start=9,
        max_operand=5,
        max_value=30,
        operations=("+", "-"),
        families=("inventory",),
    )
    problems = generate_problems(200, seed=0, config=config)
    for example in problems:
        check_problem(example, config)
        assert "*" not in example.answer
        start = int(re.search(r"has (\d+)", example.question).group(1))
        assert 2 <= start <= 9
    operands = [int(m[2]) for e in problems for m in _ANNOTATION.findall(e.answer)]
    assert max(operands) <= 5


def test_all_families_and_operations_occur():
    problems = generate_problems(400, seed=1, config=PRESETS["arith-small"])
    text = "\n".join(e.question for e in problems)
    assert "times as many" in text and "costs $" in text and "has" in text
    ops = {m[1] for e in problems for m in _ANNOTATION.findall(e.answer)}
    assert ops == {"+", "-", "*"}
    assert {len(e.answer.split("\n")) - 1 for e in problems} == {1, 2}


def test_generation_is_deterministic_and_seed_dependent():
    assert generate_problems(20, seed=7) == generate_problems(20, seed=7)
    assert generate_problems(20, seed=7) != generate_problems(20, seed=8)
    task = SyntheticTask("arith-small")
    assert task.examples("eval", 50) == SyntheticTask("arith-small").examples("eval", 50)


def test_streams_are_content_disjoint():
    task = SyntheticTask("arith-small")
    streams = {
        split: task.examples(split, n)
        for split, n in (("train", 800), ("pool", 100), ("eval", 100))
    }
    questions = {split: {e.question for e in ex} for split, ex in streams.items()}
    assert not questions["train"] & questions["eval"]
    assert not questions["train"] & questions["pool"]
    assert not questions["pool"] & questions["eval"]
    assert {question_bucket(q) for q in questions["eval"]} == {9}
    assert len(questions["eval"]) > 90  # the task is diverse enough to have few duplicates


def test_bad_knobs_and_names_are_rejected():
    with pytest.raises(ValueError, match="min_steps"):
        SyntheticConfig(min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="operations"):
        SyntheticConfig(operations=("/",))
    with pytest.raises(ValueError, match="families"):
        SyntheticConfig(families=("geometry",))
    with pytest.raises(ValueError, match="supports"):
        SyntheticConfig(min_steps=3, max_steps=3, families=("shopping",))
    with pytest.raises(ValueError, match="unknown synthetic task"):
        SyntheticTask("nope")
    with pytest.raises(ValueError, match="split"):
        next(SyntheticTask().stream("test"))


def test_answers_vary():
    answers = [int(extract_final_answer(e.answer)) for e in SyntheticTask().examples("eval", 200)]
    assert len(set(answers)) > 30 and np.mean(answers) > 5
