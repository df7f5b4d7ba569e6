"""Wrong answers in a seeded share of the training examples: the count, the marks, a final
answer that differs and is written consistently in the last worked line, determinism, and the
clean examples left untouched."""

from __future__ import annotations

import numpy as np
import pytest

from hacbo_jax.data.exact_match import extract_final_answer
from hacbo_jax.data.gsm8k import Example
from hacbo_jax.data.label_noise import with_wrong_answers
from hacbo_jax.data.synthetic import SyntheticTask


def _examples(n=50):
    return SyntheticTask("arith-small", seed=0).examples("train", n)


def test_the_share_of_wrong_answers_and_their_marks():
    clean = _examples()
    noisy, marked = with_wrong_answers(clean, 0.3, seed=1)
    assert marked.sum() == 15 and len(noisy) == len(clean)
    for c, d, m in zip(clean, noisy, marked):
        assert c.question == d.question
        if m:
            assert extract_final_answer(d.answer) != extract_final_answer(c.answer)
            assert int(extract_final_answer(d.answer)) >= 0
        else:
            assert d == c


def test_a_wrong_answer_is_written_in_the_last_worked_line_too():
    example = Example(
        "q", "Mia has 12 - 5 = <<12-5=7>>7 marbles.\nMia has 7 + 7 = <<7+7=14>>14 marbles.\n#### 14"
    )
    (noisy,), marked = with_wrong_answers([example], 1.0, seed=0)
    assert marked.all()
    new = noisy.answer.split("#### ")[-1]
    assert new != "14"
    assert f"<<7+7={new}>>{new} marbles." in noisy.answer
    assert noisy.answer.startswith("Mia has 12 - 5 = <<12-5=7>>7 marbles.\n")


def test_the_same_seed_gives_the_same_set_and_another_seed_another():
    clean = _examples()
    a, ma = with_wrong_answers(clean, 0.2, seed=3)
    b, mb = with_wrong_answers(clean, 0.2, seed=3)
    c, mc = with_wrong_answers(clean, 0.2, seed=4)
    assert a == b and np.array_equal(ma, mb)
    assert not np.array_equal(ma, mc)


def test_zero_changes_nothing_and_bad_fractions_are_refused():
    clean = _examples(5)
    same, marked = with_wrong_answers(clean, 0.0, seed=0)
    assert same == clean and not marked.any()
    with pytest.raises(ValueError, match="fraction must be in"):
        with_wrong_answers(clean, 1.5, seed=0)
    with pytest.raises(ValueError, match="only 0 examples"):
        with_wrong_answers([Example("q", "no final number")], 1.0, seed=0)


def test_a_run_config_corrupts_only_its_training_examples():
    from hacbo_jax.trainer.config import load_config
    from hacbo_jax.trainer.run_parts import load_task_data

    overrides = ["data.synthetic.n_train=400", "data.synthetic.n_eval=10", "eval.limit=null"]
    clean = load_task_data(load_config("tiny_cpu", overrides))
    noisy = load_task_data(load_config("tiny_cpu", [*overrides, "data.wrong_answers=0.25"]))
    changed = [a != b for a, b in zip(clean.train, noisy.train)]
    assert sum(changed) == 100
    assert noisy.eval == clean.eval and noisy.pool == clean.pool
