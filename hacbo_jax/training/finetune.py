"""Supervised fine-tuning of a Qwen3 model on GSM8K (or the synthetic task) under a controller.

    python -m train.finetune --config tiny_cpu [key=value ...] [--resume] [--print-config]
    hacbo-finetune --config tiny_cpu ...                  (installed package)

One jitted step per optimiser step (:mod:`hacbo_jax.training.step`); the host only feeds
batches, and reads metrics back at logging intervals. Per epoch and at the end: exact match by
batched greedy decoding. Checkpoints (orbax) hold params, optimiser + controller state, RNG, data
position and the micro-dev buffer, so ``--resume`` continues the run exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hacbo_jax.training import distributed
from hacbo_jax.training.cli_common import usage_error
from hacbo_jax.training.config import Config, ConfigError, parse_cli, save_config
from hacbo_jax.training.loop import TrainingLoop
from hacbo_jax.training.run_parts import build_run

__all__ = ["main", "run"]


def run(
    cfg: Config, *, resume: bool = False, show_progress: bool = True, stop_after: int | None = None
) -> dict:
    """Runs (or resumes) one fine-tuning run; returns the summary also written to summary.json.

    ``stop_after``: checkpoint and return right after that step, as a pre-empted job would (the
    returned dict then only says where it stopped; ``resume=True`` continues the run).
    """
    distributed.maybe_initialize()  # before anything touches a device
    parts = build_run(cfg)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    return TrainingLoop(parts, resume=resume, show_progress=show_progress).run(stop_after)


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m train.finetune") -> int:
    cfg, args = parse_cli(argv, prog=prog)
    try:
        summary = run(cfg, resume=args.resume)
    except ConfigError as e:  # found once the data is known (e.g. the micro-dev pool's size)
        return usage_error(prog, e)
    before = summary["initial_exact_match"]
    before = "" if before is None else f"{100 * before:.1f}% (base model) -> "
    print(
        f"[{summary['method']}] exact match ({summary['metric']}) {before}"
        f"{100 * summary['final_exact_match']:.1f}%, eval loss {summary['final_eval_loss']:.4f}, "
        f"on {summary['eval_examples']} held-out problems after {summary['steps']} steps "
        f"({summary['wall_time_s']:.0f} s); run directory: {cfg.output_dir}"
    )
    return 3 if summary["diverged"] else 0
