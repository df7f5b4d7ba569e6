"""The reference point of a comparison: the base model's exact match before fine-tuning, and
the persistent compilation cache shared by the runs of a grid."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from hacbo_jax.experiments.compare.report import BASE_EVAL_FILE
from hacbo_jax.trainer.config import Config

__all__ = [
    "base_eval_key",
    "base_model_exact_match",
    "enable_compilation_cache",
    "ensure_base_eval",
]


def comparable_config(config: Mapping[str, Any]) -> dict:
    """Config as it reads back from YAML, without output_dir (the directory is the run's name)."""
    plain = yaml.safe_load(yaml.safe_dump(dict(config), sort_keys=True))
    plain.pop("output_dir", None)
    return plain


def enable_compilation_cache(cache_dir: str | Path) -> None:
    """JAX persistent compilation cache in ``cache_dir``, for every compiled program."""
    import jax

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(Path(cache_dir).resolve()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def base_model_exact_match(cfg: Config) -> dict[str, Any]:
    """Exact match of the base model before any fine-tuning, on the runs' evaluation problems
    with the runs' decoding settings (the reference point of the comparison)."""
    from hacbo_jax.models.qwen3 import Qwen3ForCausalLM
    from hacbo_jax.trainer.evaluate import evaluate_exact_match, prompt_length_for
    from hacbo_jax.trainer.run_parts import DTYPES, load_task_data, load_tokenizer

    model = Qwen3ForCausalLM.from_pretrained(
        cfg.model.path, dtype=DTYPES[cfg.model.dtype], param_dtype=DTYPES[cfg.model.param_dtype]
    )
    tokenizer = load_tokenizer(cfg)
    task = load_task_data(cfg, tokenizer)
    prompt_len = prompt_length_for(task.eval + task.pool, tokenizer)
    result = evaluate_exact_match(
        model,
        tokenizer,
        task.eval,
        batch_size=cfg.eval.batch_size,
        prompt_len=prompt_len,
        max_new_tokens=cfg.eval.max_new_tokens,
        metric=cfg.eval.resolved_metric(cfg.data.format),
        ignore_case=cfg.eval.ignore_case,
    )
    weights = Path(cfg.model.path) / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None
    return {
        "exact_match": float(result.exact_match),
        "n": int(result.num_examples),
        "model_sha256": digest,
        "key": base_eval_key(cfg),
    }


def base_eval_key(cfg: Config) -> dict:
    return comparable_config(
        {
            "model": dataclasses.asdict(cfg.model),
            "data": dataclasses.asdict(cfg.data),
            "eval": dataclasses.asdict(cfg.eval),
            "microdev_pool": cfg.microdev.pool,
        }
    )


def ensure_base_eval(cfg: Config, out_dir: Path, log: Callable[[str], None] = print) -> None:
    """Measures the base model once per comparison (kept in ``OUT/base_model_eval.json``,
    re-measured when the model, data or decoding settings change)."""
    base_path = out_dir / BASE_EVAL_FILE
    saved = json.loads(base_path.read_text()) if base_path.is_file() else {}
    if saved.get("key") == base_eval_key(cfg):
        return
    log("base model (no fine-tuning): evaluating")
    result = base_model_exact_match(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_path.write_text(json.dumps(result, indent=1) + "\n")
    log(f"base model: exact match {100 * result['exact_match']:.1f}%")
