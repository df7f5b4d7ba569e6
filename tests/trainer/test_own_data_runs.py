"""A run on `prompt_completion` rows from a Parquet file, scored with the `exact` metric
(case-insensitive), on a tiny random Llama saved by transformers: the format x metric x
architecture combination the README example (messages x exact x Qwen2) and test_finetune
(question_answer x gsm8k x Qwen3) leave out."""

import json

import pytest

from hacbo_jax.assets import asset_path


@pytest.mark.slow  # ~1 minute on 2 loaded CPU cores
def test_prompt_completion_parquet_exact_metric_on_llama(tmp_path):
    import datasets
    import torch
    import transformers

    from hacbo_jax.trainer import finetune
    from hacbo_jax.trainer.config import load_config

    rows = [{"input": f"{a} times 2 is", "target": f" {2 * a}"} for a in range(40)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "train.parquet"))
    datasets.Dataset.from_list(rows[:6]).to_parquet(str(tmp_path / "eval.parquet"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(asset_path("tiny-qwen3-gsm"))
    torch.manual_seed(0)
    llama = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    transformers.LlamaForCausalLM(llama).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    cfg = load_config(
        "tiny_cpu",
        [
            f"model.path={tmp_path / 'model'}",
            f"output_dir={tmp_path / 'run'}",
            "data.task=gsm8k",
            "data.format=prompt_completion",
            "data.columns.prompt=input",
            "data.columns.completion=target",
            f"data.train_file={tmp_path / 'train.parquet'}",
            f"data.eval_file={tmp_path / 'eval.parquet'}",
            "data.max_len=16",
            "data.heldout_size=8",
            "microdev.size=8",
            "microdev.batch_size=4",
            "optim.batch_size=8",
            "optim.warmup_steps=0",
            "optim.max_steps=2",
            "eval.metric=exact",
            "eval.ignore_case=true",
            "eval.at_start=false",
            "eval.max_new_tokens=4",
            "eval.batch_size=8",
            "checkpoint.export_hf=false",
        ],
    )
    summary = finetune.run(cfg, show_progress=False)
    assert summary["steps"] == 2 and summary["train_examples"] == 32
    assert summary["metric"] == "exact" and summary["eval_examples"] == 6
    assert 0.0 < summary["final_eval_loss"] < 20.0
    predictions = [
        json.loads(line)
        for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    ]
    assert [p["reference"] for p in predictions] == [r["target"] for r in rows[:6]]
