"""The committed embedded base model assets/tiny-qwen3-gsm/: size budget, loading with our port and with
transformers, tokenizer round-trips, and logits agreement between the two loaders."""

from hacbo_jax.assets import ASSETS_DIR
import json
import os

import numpy as np
import pytest

from hacbo_jax.data import gsm8k as data

ASSET = data.ASSETS_DIR / "tiny-qwen3-gsm"
requires_asset = pytest.mark.skipif(
    not (ASSET / "model.safetensors").is_file(), reason="asset not built yet"
)


def test_pack_documents_keeps_documents_whole_and_rows_start_at_a_document():
    from hacbo_jax.trainer.pretrain_base import pack_documents

    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14], [15, 16]]
    ids, mask, used = pack_documents(docs, seq_len=6, num_rows=3, pad_id=0, eos_id=1)
    np.testing.assert_array_equal(
        ids, [[5, 6, 7, 1, 8, 1], [9, 10, 11, 12, 13, 14], [15, 16, 1, 0, 0, 0]]
    )
    np.testing.assert_array_equal(mask, ids != 0)
    assert used == 4  # the over-long third document is cut to seq_len (start kept, no EOS)
    ids, _, used = pack_documents(docs, seq_len=6, num_rows=1, pad_id=0, eos_id=1)
    assert used == 2 and ids.shape == (1, 6)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ASSET))


@requires_asset
def test_asset_within_size_budget_and_complete():
    files = {p.name for p in ASSET.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "metadata.json",
    } <= files
    total = sum(p.stat().st_size for p in ASSET.rglob("*") if p.is_file())
    assert total <= 25 * 1024 * 1024
    metadata = json.loads((ASSET / "metadata.json").read_text())
    assert 0.0 <= metadata["eval"]["exact_match"] <= 1.0 and metadata["steps"] > 0


@requires_asset
def test_tokenizer_round_trips_gsm8k_and_splits_digits(tokenizer):
    texts = [
        data.format_prompt(e.question) + data.format_target(e.answer)
        for e in data.load_gsm8k("test")[:200]
    ]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode(ids) for ids in encoded] == texts
    pieces = tokenizer.convert_ids_to_tokens(
        tokenizer("x 12345", add_special_tokens=False)["input_ids"]
    )
    assert [p for p in pieces if p.strip("Ġ").isdigit()] == list("12345")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)


@pytest.mark.slow
@requires_asset
def test_loads_with_our_port_and_transformers_with_matching_logits(tokenizer):
    import torch
    import transformers

    from hacbo_jax.models.qwen3 import Qwen3ForCausalLM

    ours = Qwen3ForCausalLM.from_pretrained(ASSET)
    theirs = transformers.Qwen3ForCausalLM.from_pretrained(str(ASSET)).eval()
    config = json.loads((ASSET / "config.json").read_text())
    assert ours.config.vocab_size == config["vocab_size"] == len(tokenizer)
    ids = tokenizer(
        [
            data.format_prompt(
                "Mia has 3 apples. She buys 4 more apples. How many apples does Mia have now?"
            )
        ],
        add_special_tokens=False,
        return_tensors="np",
    )["input_ids"].astype(np.int32)
    our_logits = np.asarray(ours(ids))
    with torch.no_grad():
        their_logits = theirs(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(our_logits, their_logits, atol=2e-4, rtol=1e-4)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
