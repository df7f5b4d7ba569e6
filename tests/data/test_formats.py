"""Data formats (hacbo_jax.data.formats): exact loss masks per format, local file types,
column names, up-front row errors, hub argument plumbing, and the config keys that pick them."""

from __future__ import annotations

from hacbo_jax.assets import ASSETS_DIR

import json
from pathlib import Path

import numpy as np
import pytest

from hacbo_jax.data import gsm8k as data
from hacbo_jax.trainer.config import ConfigError, config_from_dict
from hacbo_jax.data.gsm8k import Example
from hacbo_jax.data.formats import (
    DataError,
    load_examples,
    load_hub_examples,
    messages_example,
    rows_to_examples,
)

QWEN3_TOKENIZER = ASSETS_DIR / "qwen3-tokenizer"
IM_END = 151_645


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(QWEN3_TOKENIZER))


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def trained_targets(arrays, row: int) -> list[int]:
    return arrays.targets[row][arrays.loss_mask[row] == 1].tolist()


def real_tokens(arrays, row: int) -> list[int]:
    return arrays.input_ids[row][arrays.attention_mask[row] == 1].tolist()


# -- loss masks, by hand, per format ------------------------------------------------------------


def test_question_answer_mask_is_answer_and_eos(tokenizer):
    [example] = rows_to_examples([{"question": "1+1?", "answer": "2\n#### 2"}], "question_answer")
    arrays = data.tokenize_sft([example], tokenizer, max_len=32)
    prompt, answer = ids(tokenizer, "Question: 1+1?\nAnswer:"), ids(tokenizer, " 2\n#### 2")
    assert real_tokens(arrays, 0) == prompt + answer + [IM_END]
    assert trained_targets(arrays, 0) == answer + [IM_END]
    # loss_mask[t] = 1 exactly where targets[t] = input_ids[t + 1] is an answer token or EOS.
    n = len(prompt) + len(answer) + 1
    assert np.flatnonzero(arrays.loss_mask[0]).tolist() == list(range(len(prompt) - 1, n - 1))


def test_prompt_completion_is_verbatim_with_eos_trained(tokenizer):
    rows = [{"input": "Capital of France?", "output": " Paris"}]
    [example] = rows_to_examples(
        rows, "prompt_completion", columns={"prompt": "input", "completion": "output"}
    )
    assert (example.question, example.answer) == ("Capital of France?", " Paris")
    arrays = data.tokenize_sft([example], tokenizer, max_len=16)
    prompt, completion = ids(tokenizer, "Capital of France?"), ids(tokenizer, " Paris")
    assert real_tokens(arrays, 0) == prompt + completion + [IM_END]
    assert trained_targets(arrays, 0) == completion + [IM_END]
    assert np.flatnonzero(arrays.loss_mask[0]).tolist() == list(
        range(len(prompt) - 1, len(prompt) + len(completion))
    )
    # No GSM8K clean-up on other formats: "1,000" stays.
    [kept] = rows_to_examples([{"prompt": "a 1,000 ", "completion": "b"}], "prompt_completion")
    assert kept.question == "a 1,000 "


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
]


def test_messages_train_assistant_turns_only(tokenizer):
    example = messages_example(CONVERSATION, tokenizer)
    assert (example.question, example.answer) == ("Capital of France?", "Paris")
    assert not example.append_eos  # the template ends each assistant turn with <|im_end|>
    arrays = data.tokenize_sft([example], tokenizer, max_len=128)
    # Qwen3's template, written out by hand: system, user, assistant (earlier turn: no think
    # block), user, assistant (last turn: an empty think block, which is not trained).
    head1 = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    head2 = (
        "\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    turn1, turn2 = ids(tokenizer, "Hello!") + [IM_END], ids(tokenizer, "Paris") + [IM_END]
    expected = ids(tokenizer, head1) + turn1 + ids(tokenizer, head2) + turn2 + ids(tokenizer, "\n")
    assert real_tokens(arrays, 0) == expected
    assert tokenizer.decode(expected) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    # The trained targets are the two assistant turns with their <|im_end|>, nothing else.
    assert trained_targets(arrays, 0) == turn1 + turn2
    start1 = len(ids(tokenizer, head1))
    start2 = start1 + len(turn1) + len(ids(tokenizer, head2))
    positions = list(range(start1 - 1, start1 - 1 + len(turn1)))
    positions += list(range(start2 - 1, start2 - 1 + len(turn2)))
    assert np.flatnonzero(arrays.loss_mask[0]).tolist() == positions
    # The evaluation prompt is the training text before the last assistant content.
    prompt = data.prompt_token_ids([example], tokenizer)[0]
    assert prompt == expected[:start2]
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_messages_without_eos_in_template_append_it():
    from hacbo_jax.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["user: hi\nassistant: hello\n"] * 20, vocab_size=300)
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    example = messages_example([{"role": "user", "content": "hi"}, CONVERSATION[2]], tok)
    assert example.append_eos
    arrays = data.tokenize_sft([example], tok, max_len=64)
    assert trained_targets(arrays, 0) == ids(tok, "Hello!") + [tok.eos_token_id]


def test_messages_errors(tokenizer):
    from hacbo_jax.data.tokenizer import train_tokenizer

    no_template = train_tokenizer(["a b c"] * 10, vocab_size=270)
    with pytest.raises(ValueError, match="chat template"):
        messages_example(CONVERSATION, no_template)
    with pytest.raises(DataError, match=r'row 1: field "messages": .*empty content'):
        rows_to_examples(
            [{"messages": [{"role": "assistant", "content": " "}]}],
            "messages",
            tokenizer=tokenizer,
        )


# -- files, columns, row errors -----------------------------------------------------------------

ROWS = [{"q": "What is 2+2?", "a": "#### 4"}, {"q": "Name a colour", "a": "red"}]
COLUMNS = {"question": "q", "answer": "a"}


def write(path: Path, rows) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_local_file_types_load_the_same_examples(tmp_path, suffix):
    path = write(tmp_path / f"rows{suffix}", ROWS)
    examples = load_examples(path, "question_answer", columns=COLUMNS)
    assert examples == [Example("What is 2+2?", "#### 4"), Example("Name a colour", "red")]


def test_messages_file_loads(tmp_path, tokenizer):
    path = write(tmp_path / "chat.jsonl", [{"conv": CONVERSATION}])
    [example] = load_examples(path, "messages", columns={"messages": "conv"}, tokenizer=tokenizer)
    assert example == messages_example(CONVERSATION, tokenizer)


@pytest.mark.parametrize(
    "suffix, rows, data_format, expected",
    [
        (
            ".jsonl",
            [{"prompt": "a", "completion": "b"}, {"prompt": "c"}],
            "prompt_completion",
            r'line 2: field "completion" is missing',
        ),
        (
            ".jsonl",
            [{"question": "a", "answer": 3}],
            "question_answer",
            r'line 1: field "answer" is a int; expected a string',
        ),
        (
            ".parquet",
            [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}],
            "prompt_completion",
            r'row 2: field "completion" is null',
        ),
        (
            ".json",
            [{"messages": [{"role": "user", "content": "hi"}]}],
            "messages",
            r'row 1: field "messages" has no "assistant" turn',
        ),
        (
            ".jsonl",
            [{"messages": [{"role": "user"}]}],
            "messages",
            r'line 1: field "messages\[0\]\.content" is missing',
        ),
    ],
)
def test_bad_rows_fail_up_front_naming_file_row_and_field(
    tmp_path, tokenizer, suffix, rows, data_format, expected
):
    path = write(tmp_path / f"bad{suffix}", rows)
    with pytest.raises(DataError, match=expected) as error:
        load_examples(path, data_format, tokenizer=tokenizer)
    assert str(path) in str(error.value)


def test_malformed_jsonl_and_file_type(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n{not json\n')
    with pytest.raises(DataError, match=r"(?s)x\.jsonl: .*line 2: malformed JSON"):
        load_examples(path)
    with pytest.raises(DataError, match="unsupported file type"):
        load_examples(tmp_path / "x.csv")


def test_all_bad_rows_are_counted_in_one_error(tmp_path):
    rows = [{"question": "q"}] * 7
    with pytest.raises(DataError, match=r"7 bad row\(s\)(.|\n)*and 2 more"):
        load_examples(write(tmp_path / "bad.jsonl", rows))


# -- hub plumbing and the run's data loading ----------------------------------------------------


def test_hub_arguments_reach_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, *, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"prompt": f"{split} p", "completion": "c"}] * 3)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    [first, *_] = load_hub_examples("org/qa", "validation", "prompt_completion", hub_config="v2")
    assert calls == [("org/qa", "v2", "validation")] and first.question == "validation p"

    from hacbo_jax.trainer.run_parts import load_task_data

    calls.clear()
    cfg = config_from_dict(
        {
            "data": {
                "hub_name": "org/qa",
                "hub_config": "v2",
                "train_split": "tr",
                "eval_split": "dev",
                "format": "prompt_completion",
                "heldout_size": 1,
            },
            "optim": {"batch_size": 1},
            "microdev": {"size": 1, "batch_size": 1},
        }
    )
    task = load_task_data(cfg)
    assert calls == [("org/qa", "v2", "tr"), ("org/qa", "v2", "dev")]
    assert (len(task.train), len(task.pool), task.eval[0].question) == (2, 1, "dev p")


def test_bad_rows_stop_the_run_before_the_model_loads(tmp_path):
    from hacbo_jax.trainer.run_parts import build_run

    bad = write(tmp_path / "train.jsonl", [{"prompt": "p", "completion": "c"}] * 3 + [{}])
    cfg = config_from_dict(
        {
            "model": {
                "path": str(tmp_path / "no-model-needed"),
                "tokenizer": str(QWEN3_TOKENIZER),
            },
            "data": {
                "format": "prompt_completion",
                "train_file": str(bad),
                "eval_file": str(bad),
                "heldout_size": 1,
            },
            "optim": {"batch_size": 1},
            "microdev": {"size": 1, "batch_size": 1},
        },
        check_paths=False,
    )
    with pytest.raises(ConfigError, match=r'(?s)train\.jsonl: .*line 4: field "prompt" is missing'):
        build_run(cfg)


def test_config_checks_format_and_file_type(tmp_path):
    with pytest.raises(ConfigError, match="data.format = 'messages': the synthetic task"):
        config_from_dict({"data": {"task": "synthetic", "format": "messages"}})
    csv = tmp_path / "x.csv"
    csv.write_text("q,a\n")
    with pytest.raises(ConfigError, match=r"data.train_file = .*unsupported file type '\.csv'"):
        config_from_dict({"data": {"train_file": str(csv)}})
    with pytest.raises(ConfigError, match="data.format = 'chat': must be one of"):
        config_from_dict({"data": {"format": "chat"}})


def test_metric_default_follows_the_format():
    cfg = config_from_dict({})
    assert cfg.eval.resolved_metric(cfg.data.format) == "gsm8k"
    assert cfg.eval.resolved_metric("messages") == "exact"
    assert cfg.eval.resolved_metric("prompt_completion") == "exact"
    cfg = config_from_dict({"eval": {"metric": "exact", "ignore_case": True}})
    assert cfg.eval.resolved_metric("question_answer") == "exact"
