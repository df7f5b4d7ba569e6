"""Supervised fine-tuning of a Qwen3 model on GSM8K (or the synthetic task) under a controller.

    python -m train.finetune --config tiny_cpu [key=value ...] [--resume] [--print-config]
    hacbo-finetune --config tiny_cpu ...                  (installed package)

One jitted step per optimiser step (:mod:`hacbo_jax.trainer.step`); the host only feeds
batches, and reads metrics back at logging intervals. Per epoch and at the end: exact match by
batched greedy decoding. Checkpoints (orbax) hold params, optimiser + controller state, RNG, data
position and the micro-dev buffer, so ``--resume`` continues the run exactly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import yaml

from hacbo_jax.trainer import distributed
from hacbo_jax.trainer.cli_common import usage_error
from hacbo_jax.trainer.config import (
    Config,
    ConfigError,
    config_from_dict,
    parse_cli,
    save_config,
)
from hacbo_jax.trainer.config.validate import check_run_inputs, resume_differences
from hacbo_jax.trainer.loop import TrainingLoop
from hacbo_jax.trainer.run_parts import build_run

__all__ = ["EXIT_DIVERGED", "EXIT_PREEMPTED", "main", "run"]

EXIT_DIVERGED = 3  # the run stopped after divergence.max_consecutive_nonfinite skipped steps
# SIGTERM (pre-emption): checkpointed at the next step boundary, continue with --resume. The
# shell's status of a process ended by SIGTERM (128 + 15), so that `finetune && report` does not
# go on as if the run had finished.
EXIT_PREEMPTED = 143


def _check_resume(cfg: Config, problems: list[str]) -> tuple[list[str], dict | None]:
    """``(allowed changes, summary of a finished run or None)``; refused changes go to
    ``problems``. The requested config is compared with the run's ``config.yaml``."""
    run_dir = Path(cfg.output_dir)
    saved_path = run_dir / "config.yaml"
    try:
        raw = yaml.safe_load(saved_path.read_text())
        saved = config_from_dict(raw, name=str(saved_path), check_paths=False)
    except (OSError, yaml.YAMLError, ConfigError, TypeError, AttributeError) as e:
        problems.append(f"--resume: {saved_path} cannot be read as the run's config ({e})")
        return [], None
    refused, allowed = resume_differences(saved, cfg)
    if refused:
        problems.append(
            f"--resume: the run in {run_dir} was made with another config; these keys change "
            "its trajectory and may not change on resume (start a new run in another "
            "output_dir instead):\n      " + "\n      ".join(refused)
        )
    summary_path = run_dir / "summary.json"
    finished = None
    if summary_path.is_file():
        try:
            finished = json.loads(summary_path.read_text())
        except ValueError:
            finished = None  # a half-written summary: the run did not finish
    return allowed, finished


def run(
    cfg: Config, *, resume: bool = False, show_progress: bool = True, stop_after: int | None = None
) -> dict:
    """Runs (or resumes) one fine-tuning run; returns the summary also written to summary.json.

    ``stop_after``: checkpoint and return right after that step, as a pre-empted job would (the
    returned dict then only says where it stopped; ``resume=True`` continues the run). A SIGTERM
    does the same at the next step boundary (the dict then also holds ``"preempted": True``).

    Before anything is written or any model is built, every input is checked
    (:func:`~hacbo_jax.trainer.config.validate.check_run_inputs`; on ``resume`` also the
    requested config against the run's): ConfigError lists every problem. A non-empty
    ``output_dir`` is never overwritten; ``resume=True`` on a finished run returns its summary
    (with ``"already_finished": True``) and changes nothing.
    """
    distributed.maybe_initialize()  # before anything touches a device
    problems = check_run_inputs(cfg, resume=resume)
    allowed: list[str] = []
    if resume and not problems:
        allowed, finished = _check_resume(cfg, problems)
        if finished is not None and not problems:
            return {**finished, "already_finished": True}
    if problems:
        raise ConfigError("cannot start the run:\n" + "\n".join(f"  - {p}" for p in problems))
    parts = build_run(cfg)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if allowed:
        print("resume: changed settings (allowed):\n  " + "\n  ".join(allowed), file=sys.stderr)
        with open(run_dir / "resume_changes.jsonl", "a") as f:
            f.write(json.dumps({"changes": allowed}) + "\n")
    save_config(cfg, run_dir / "config.yaml")
    return TrainingLoop(parts, resume=resume, show_progress=show_progress).run(stop_after)


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m train.finetune") -> int:
    cfg, args = parse_cli(argv, prog=prog)
    try:
        summary = run(cfg, resume=args.resume)
    except ConfigError as e:  # found once the data is known (e.g. the micro-dev pool's size)
        return usage_error(prog, e)
    if summary.get("already_finished"):
        print(
            f"the run in {cfg.output_dir} already finished at step {summary.get('steps')} "
            "(summary.json); nothing to resume, nothing changed"
        )
        return EXIT_DIVERGED if summary.get("diverged") else 0
    if "stopped_at" in summary:
        print(
            f"received SIGTERM: checkpointed step {summary['stopped_at']} in {cfg.output_dir}; "
            "continue with --resume",
            file=sys.stderr,
        )
        return EXIT_PREEMPTED
    before = summary["initial_exact_match"]
    before = "" if before is None else f"{100 * before:.1f}% (base model) -> "
    print(
        f"[{summary['method']}] exact match ({summary['metric']}) {before}"
        f"{100 * summary['final_exact_match']:.1f}%, eval loss {summary['final_eval_loss']:.4f}, "
        f"on {summary['eval_examples']} held-out problems after {summary['steps']} steps "
        f"({summary['wall_time_s']:.0f} s); run directory: {cfg.output_dir}"
    )
    return EXIT_DIVERGED if summary["diverged"] else 0
