"""Short fine-tuning runs of the tiny_cpu config on a tiny checkpoint, and reading what they write."""

from __future__ import annotations

import json
from pathlib import Path

from flax import nnx

from hacbo_jax.models.qwen3 import Qwen3ForCausalLM
from hacbo_jax.trainer.config import CONFIGS_DIR, load_config

CONFIG = CONFIGS_DIR / "tiny_cpu.yaml"


def quick_overrides(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """tiny_cpu.yaml scaled down to 12 steps: K = 3, refresh every 4 steps, logs every 2.
    A key given again (in ``extra``) replaces the earlier value, as load_config would: the
    command line refuses a key given twice."""
    base = [
        f"model.path={model_dir}",
        f"output_dir={output_dir}",
        "data.synthetic.n_train=96",
        "data.synthetic.n_eval=8",
        "data.heldout_size=24",
        "data.max_len=96",
        "optim.batch_size=8",
        "optim.micro_batch_size=4",
        "optim.warmup_steps=2",
        "optim.epochs=1",
        "optim.max_steps=12",
        "controller.hacbo.interval=3",
        "controller.hacbo.patience=2",
        "microdev.size=16",
        "microdev.batch_size=4",
        "microdev.refresh_every=4",
        "microdev.max_candidates=8",
        "eval.limit=8",
        "eval.max_new_tokens=8",
        "eval.batch_size=8",
        "logging.every=2",
        "checkpoint.every=5",
        "checkpoint.keep=2",
    ]
    last = {item.partition("=")[0].strip(): item for item in [*base, *extra]}
    return list(last.values())


def quick_config(model_dir: Path, output_dir: Path, *extra: str):
    return load_config(CONFIG, quick_overrides(model_dir, output_dir, *extra))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def restored_params(run_dir: Path):
    model = Qwen3ForCausalLM.from_pretrained(run_dir / "hf_model")
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
