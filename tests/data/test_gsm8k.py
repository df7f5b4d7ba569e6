"""GSM8K loading, preprocessing, SFT tokenisation/masking, prompt batches and resumable sampling."""

from hacbo_jax.assets import ASSETS_DIR
import json
from pathlib import Path

import numpy as np
import pytest

from hacbo_jax.data import gsm8k as data
from hacbo_jax.data.gsm8k import Example
from hacbo_jax.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def gsm8k_train():
    return data.load_gsm8k("train")


@pytest.fixture(scope="module")
def tokenizer(gsm8k_train):
    texts = [
        data.format_prompt(e.question) + data.format_target(e.answer) for e in gsm8k_train[:500]
    ]
    return train_tokenizer(texts, vocab_size=400)


def test_bundled_splits_load_with_expected_sizes(gsm8k_train):
    test = data.load_gsm8k("test")
    assert (len(gsm8k_train), len(test)) == (7473, 1319)
    first = gsm8k_train[0]
    assert first.question.startswith("Natalia sold clips to 48")
    assert first.answer.endswith("#### 72")
    assert data.reference_answer(first.answer) == "72"


def test_preprocessing_strips_whitespace_and_thousands_commas():
    assert data.clean_text("  a 1,000 b 12,345,678 \n") == "a 1000 b 12345678"
    assert data.clean_text("x  \nhas 3,5 and 1,2345, yes, ok") == "x\nhas 3,5 and 1,2345, yes, ok"
    raw = Example(" She paid $1,200. \n", "1,200 / 2 = <<1200/2=600>>600  \n#### 600 ")
    assert data.preprocess(raw) == Example(
        "She paid $1200.", "1200 / 2 = <<1200/2=600>>600\n#### 600"
    )


def test_no_thousands_comma_left_in_bundled_data(gsm8k_train):
    import re

    pattern = re.compile(r"\d,\d{3}(?!\d)")
    assert not any(pattern.search(e.question + e.answer) for e in gsm8k_train)
    raw = data.load_gsm8k("train", preprocess_text=False)
    assert any(pattern.search(e.question + e.answer) for e in raw)  # the raw data has some


def test_load_errors_name_file_line_and_expectation(tmp_path):
    with pytest.raises(ValueError, match="split='dev'"):
        data.load_gsm8k("dev", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train\.jsonl"):
        data.load_gsm8k("train", data_dir=tmp_path)
    good = json.dumps({"question": "q", "answer": "#### 1"})
    (tmp_path / "train.jsonl").write_text(good + "\n{not json\n")
    with pytest.raises(ValueError, match=r"train\.jsonl:2: malformed JSON"):
        data.load_gsm8k("train", data_dir=tmp_path)
    (tmp_path / "train.jsonl").write_text(good + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(
        ValueError, match=r'train\.jsonl:2: field "answer" is missing; expected a string'
    ):
        data.load_gsm8k("train", data_dir=tmp_path)
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": 3, "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match=r'train\.jsonl:1: field "question" is a int'):
        data.load_gsm8k("train", data_dir=tmp_path)
    (tmp_path / "train.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="expected a JSON object"):
        data.load_gsm8k("train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="not both"):
        data.load_gsm8k("train", data_dir=tmp_path, hub_name="openai/gsm8k")


def test_load_small_local_file_through_datasets(tmp_path):
    rows = [{"question": f" q{i} ", "answer": f"#### {i},000"} for i in range(3)]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert data.load_gsm8k("test", data_dir=tmp_path) == [
        Example(f"q{i}", f"#### {i}000") for i in range(3)
    ]


def test_holdout_split_is_deterministic_disjoint_and_complete():
    train, pool = data.holdout_split(7473)
    assert (train.size, pool.size) == (6000, 1473)
    assert np.intersect1d(train, pool).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, pool])), np.arange(7473))
    again, _ = data.holdout_split(7473)
    np.testing.assert_array_equal(train, again)
    assert not np.array_equal(pool, data.holdout_split(7473, seed=1)[1])
    with pytest.raises(ValueError, match="holdout_size"):
        data.holdout_split(10, 10)


def test_prompt_format_is_defined_once():
    assert data.format_prompt("What is 1+1?") == "Question: What is 1+1?\nAnswer:"
    assert data.format_target("1+1 = 2\n#### 2") == " 1+1 = 2\n#### 2"


def test_sft_layout_masks_only_answer_targets(tokenizer):
    examples = [Example("How many?", "2 + 3 = <<2+3=5>>5\n#### 5"), Example("Q", "#### 1")]
    arrays = data.tokenize_sft(examples, tokenizer, max_len=64)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    for row, example in enumerate(examples):
        prompt = tokenizer(data.format_prompt(example.question), add_special_tokens=False)[
            "input_ids"
        ]
        answer = tokenizer(data.format_target(example.answer), add_special_tokens=False)[
            "input_ids"
        ]
        expected = prompt + answer + [eos]
        n, p = len(expected), len(prompt)
        np.testing.assert_array_equal(arrays.input_ids[row, :n], expected)
        assert (arrays.input_ids[row, n:] == pad).all()
        np.testing.assert_array_equal(arrays.attention_mask[row], np.arange(64) < n)
        # targets are the next tokens; the loss covers exactly the answer tokens and EOS.
        np.testing.assert_array_equal(arrays.targets[row, :-1], arrays.input_ids[row, 1:])
        masked_targets = arrays.targets[row][arrays.loss_mask[row] == 1]
        np.testing.assert_array_equal(masked_targets, answer + [eos])
        np.testing.assert_array_equal(
            np.flatnonzero(arrays.loss_mask[row]), np.arange(p - 1, n - 1)
        )
    assert arrays.input_ids.dtype == np.int32 and arrays.loss_mask.dtype == np.float32
    assert arrays.num_truncated == 0
    assert tokenizer.decode(
        arrays.input_ids[0][arrays.attention_mask[0] == 1], skip_special_tokens=True
    ) == (data.format_prompt(examples[0].question) + data.format_target(examples[0].answer))


def test_truncation_is_counted_and_keeps_fixed_shape(tokenizer):
    examples = [Example("short", "#### 1"), Example("long " * 40, "1 + 1 = 2 " * 20 + "\n#### 2")]
    arrays = data.tokenize_sft(examples, tokenizer, max_len=24)
    assert arrays.input_ids.shape == (2, 24) and arrays.num_truncated == 1
    assert arrays.attention_mask[1].all() and arrays.loss_mask[1, -1] == 0
    with pytest.raises(ValueError, match="max_len"):
        data.tokenize_sft(examples, tokenizer, max_len=1)


def test_gsm8k_truncation_count_matches_full_lengths(gsm8k_train, tokenizer):
    full = data.tokenize_sft(gsm8k_train[:300], tokenizer, max_len=2048)
    lengths = full.attention_mask.sum(1)
    assert full.num_truncated == 0 and lengths.max() < 2048
    for max_len in (64, 128, 512):
        assert data.tokenize_sft(
            gsm8k_train[:300], tokenizer, max_len=max_len
        ).num_truncated == int((lengths > max_len).sum())
    assert (lengths > 128).any()  # the check above is not vacuous


def test_prompt_batches_are_left_padded_fixed_shape(tokenizer):
    questions = ["a", "a longer question here", "b"]
    batches = list(data.prompt_batches(questions, tokenizer, batch_size=2, prompt_len=16))
    assert [b.num_valid for b in batches] == [2, 1]
    for batch in batches:
        assert batch.input_ids.shape == (2, 16) and batch.attention_mask.shape == (2, 16)
    ids, mask = batches[0].input_ids[1], batches[0].attention_mask[1]
    expected = tokenizer(data.format_prompt(questions[1]), add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(ids[16 - len(expected) :], expected)
    np.testing.assert_array_equal(mask, np.arange(16) >= 16 - len(expected))
    assert (ids[: 16 - len(expected)] == tokenizer.pad_token_id).all()
    np.testing.assert_array_equal(batches[1].input_ids[1], batches[1].input_ids[0])  # filler row
    ids, mask, truncated = data.tokenize_prompts(["word " * 50], tokenizer, prompt_len=8)
    assert truncated == 1 and mask.all()
    assert tokenizer.decode(ids[0]).endswith("\nAnswer:")


def test_sampler_epochs_are_seeded_permutations():
    sampler = data.EpochSampler(10, 3, seed=5)
    assert sampler.batches_per_epoch == 3
    epoch0 = np.concatenate([sampler.next_indices() for _ in range(3)])
    assert np.unique(epoch0).size == 9  # the 10th example is the dropped remainder
    np.testing.assert_array_equal(epoch0, sampler.epoch_order(0)[:9])
    first_of_epoch1 = sampler.next_indices()
    assert sampler.position == data.DataPosition(1, 3)
    np.testing.assert_array_equal(first_of_epoch1, sampler.epoch_order(1)[:3])
    assert not np.array_equal(sampler.epoch_order(0), sampler.epoch_order(1))
    np.testing.assert_array_equal(
        sampler.epoch_order(1), data.EpochSampler(10, 3, seed=5).epoch_order(1)
    )


def test_sampler_resume_is_exact():
    reference = data.EpochSampler(50, 4, seed=1)
    stream = [reference.next_indices() for _ in range(30)]
    resumed = data.EpochSampler(50, 4, seed=1)
    for _ in range(17):
        resumed.next_indices()
    # A checkpoint stores the position as a JSON list (see finetune's checkpoint hook).
    position = data.DataPosition(*json.loads(json.dumps(list(resumed.position))))
    fresh = data.EpochSampler(50, 4, seed=1, position=position)
    for expected in stream[17:]:
        np.testing.assert_array_equal(fresh.next_indices(), expected)
    assert fresh.epoch_fraction == pytest.approx(30 / 12)
    with pytest.raises(ValueError, match="invalid position"):
        data.EpochSampler(50, 4, position=data.DataPosition(0, 3))
    with pytest.raises(ValueError, match="batch_size"):
        data.EpochSampler(3, 4)


def test_sft_take_returns_batch_dict(tokenizer):
    arrays = data.tokenize_sft([Example("q", "#### 1")] * 5, tokenizer, max_len=16)
    batch = arrays.take(np.array([0, 3]))
    assert set(batch) == {"input_ids", "attention_mask", "targets", "loss_mask"}
    assert batch["input_ids"].shape == (2, 16) and len(arrays) == 5
