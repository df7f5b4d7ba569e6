"""The paper path end to end except for the weights: ``train.finetune`` with
``configs/paper_hacbo.yaml`` on a randomly initialised Qwen3 with the REAL vocabulary (2 layers,
tiny width, saved without a tokenizer, so the shipped Qwen3 tokenizer is used) runs its first
jitted step, evaluates and writes its logs.

Overrides: one step, no warm-up, ``max_len`` 64, batch 8 in micro-batches of 4, a micro-dev
batch of 4, two evaluation problems decoded 4 tokens; everything else (bf16 compute, fp32 master
weights, remat "dots", scanned layers, packed rows, logits chunks of 128, HACBO with the paper's
values, micro-dev pool = the test split, the full GSM8K train split tokenised with the real
tokenizer) is the paper config's, except cuDNN attention (GPU only), replaced by XLA's.
"""

from __future__ import annotations

from hacbo_jax.assets import ASSETS_DIR

import json
from pathlib import Path

import pytest
from flax import nnx

ASSETS = ASSETS_DIR


def _random_qwen3_with_the_real_vocabulary(model_dir: Path) -> Path:
    from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=151_936,  # Qwen3-0.6B's embedding rows (the tokenizer has 151,669 tokens)
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
        bos_token_id=151_643,
        eos_token_id=151_645,
    )
    Qwen3ForCausalLM(config, rngs=nnx.Rngs(0)).save_pretrained(model_dir)
    assert not (model_dir / "tokenizer.json").exists()
    return model_dir


@pytest.mark.slow  # ~2 minutes on 2 loaded CPU cores: a 151,936-row embedding and 7,473 rows
def test_paper_hacbo_reaches_its_first_step_with_the_real_tokenizer(tmp_path):
    from hacbo_jax.trainer import finetune
    from hacbo_jax.trainer.config import load_config

    model_dir = _random_qwen3_with_the_real_vocabulary(tmp_path / "qwen3-random")
    run_dir = tmp_path / "run"
    cfg = load_config(
        "paper_hacbo",
        [
            f"model.path={model_dir}",
            f"output_dir={run_dir}",
            "optim.max_steps=1",
            "optim.warmup_steps=0",
            "optim.batch_size=8",
            "optim.micro_batch_size=4",
            "data.max_len=64",
            "microdev.batch_size=4",
            "eval.limit=2",
            "eval.batch_size=2",
            "eval.max_new_tokens=4",
            "checkpoint.export_hf=false",
            # The paper configs ask for cuDNN attention (GPU); on CPU the same arguments go to
            # the XLA implementation of jax.nn.dot_product_attention.
            "model.attention_impl=xla",
        ],
    )
    assert Path(cfg.model.tokenizer) == (ASSETS / "qwen3-tokenizer").resolve()
    m = cfg.model
    assert (m.dtype, m.param_dtype, m.remat, m.scan_layers, cfg.data.packing) == (
        "bfloat16",
        "float32",
        "dots",
        True,
        True,
    )
    assert cfg.controller.kind == "hacbo"
    summary = finetune.run(cfg, show_progress=False)
    assert summary["steps"] == 1 and not summary["diverged"] and summary["skipped_steps"] == 0
    assert summary["train_examples"] == 7473 and summary["metric"] == "gsm8k"
    # An untrained model over 151,936 tokens: both losses near ln(151936) = 11.93.
    assert 11.0 < summary["final_train_loss"] < 13.0
    assert 11.0 < summary["final_eval_loss"] < 13.0
    [row] = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert row["eval_loss"] == summary["final_eval_loss"] and row["n"] == 2
    assert row["programs_compiled"] <= 1 and summary["generation_programs"] <= 1


@pytest.mark.slow
def test_paper_hacbo_batch2_builds_and_takes_its_first_steps(tmp_path):
    """The batch-2 reading (11,208 steps) with its own batch of 2 and no accumulation: two steps
    (warm-up shortened to fit them; XLA attention for cuDNN's, as above)."""
    from hacbo_jax.trainer import finetune
    from hacbo_jax.trainer.config import load_config

    model_dir = _random_qwen3_with_the_real_vocabulary(tmp_path / "qwen3-random")
    cfg = load_config(
        "paper_hacbo_batch2",
        [
            f"model.path={model_dir}",
            f"output_dir={tmp_path / 'run'}",
            "optim.max_steps=2",
            "optim.warmup_steps=1",
            "data.max_len=64",
            "microdev.batch_size=4",
            "eval.limit=2",
            "eval.batch_size=2",
            "eval.max_new_tokens=4",
            "checkpoint.export_hf=false",
            "model.attention_impl=xla",
        ],
    )
    assert (cfg.optim.batch_size, cfg.optim.micro_batch_size) == (2, 2)
    summary = finetune.run(cfg, show_progress=False)
    assert summary["steps"] == 2 and not summary["diverged"] and summary["skipped_steps"] == 0
