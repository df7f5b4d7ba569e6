"""Supervised fine-tuning of a Qwen3 model on GSM8K (or the synthetic task) under a controller.

    python -m train.finetune --config tiny_cpu [key=value ...] [--resume] [--print-config]
    hacbo-finetune --config tiny_cpu ...                  (installed package)

One jitted step per optimiser step (:mod:`hacbo_jax.trainer.step`); the host only feeds
batches, and reads metrics back at logging intervals. Per epoch and at the end: exact match by
batched greedy decoding. Checkpoints (orbax) hold params, optimiser + controller state, RNG, data
position and the micro-dev buffer, so ``--resume`` continues the run exactly.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

import yaml

from hacbo_jax.trainer import distributed
from hacbo_jax.trainer.cli_common import cli_main
from hacbo_jax.trainer.config import (
    Config,
    ConfigError,
    config_from_dict,
    parse_cli,
    save_config,
)
from hacbo_jax.trainer.config.validate import (
    check_output_dir,
    check_run_inputs,
    resume_differences,
    stopped_before_first_checkpoint,
)
from hacbo_jax.trainer.loop import TrainingLoop
from hacbo_jax.trainer.run_lock import LOCK_NAME, hold_run_lock
from hacbo_jax.trainer.run_parts import build_run

__all__ = [
    "EXIT_DIVERGED",
    "EXIT_INTERRUPTED",
    "EXIT_NONFINITE",
    "EXIT_PREEMPTED",
    "EXIT_USAGE",
    "main",
    "run",
]

EXIT_USAGE = 2  # invalid config/input, output_dir holds a run (no --resume), or is locked
EXIT_DIVERGED = 3  # the run stopped after divergence.max_consecutive_nonfinite skipped steps
# The run reached its end but its result is not finite: no step had a finite loss, or the final
# training loss, eval loss or parameters are NaN/inf (summary.json: "nonfinite", "nonfinite_reason").
EXIT_NONFINITE = 4
# SIGINT (Ctrl-C): checkpointed at the next step boundary, continue with --resume (128 + 2).
EXIT_INTERRUPTED = 130
# SIGTERM (pre-emption): checkpointed at the next step boundary, continue with --resume. The
# shell's status of a process ended by SIGTERM (128 + 15), so that `finetune && report` does not
# go on as if the run had finished.
EXIT_PREEMPTED = 143


def _clear_for_restart(run_dir: Path) -> None:
    """Removes what an interrupted run left in ``run_dir`` (the lock file stays: it is held)."""
    left = sorted(p for p in run_dir.iterdir() if p.name != LOCK_NAME)
    print(
        f"resume: {run_dir} holds no complete checkpoint (the run was stopped before its first "
        "checkpoint was on disk); starting it again from step 0 in that directory, removing "
        "what it left: " + ", ".join(p.name for p in left),
        file=sys.stderr,
    )
    for p in left:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


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
    (with ``"already_finished": True``) and changes nothing. ``resume=True`` on a directory
    that holds a run's files but no complete checkpoint (killed before or during its first
    save) starts that run again from step 0 there, removing what it left (said on stderr).

    One process at a time owns ``output_dir``: it holds an exclusive ``flock`` on
    ``output_dir/.run.lock`` (:mod:`hacbo_jax.trainer.run_lock`) from before it writes anything
    until it returns; another process gets :class:`~hacbo_jax.trainer.run_lock.RunLocked` (a
    ConfigError) at once.
    """
    distributed.maybe_initialize()  # before anything touches a device
    run_dir = Path(cfg.output_dir)
    with contextlib.ExitStack() as stack:
        # A live run has made its lock file: refuse before anything else, writing nothing.
        locked = (run_dir / LOCK_NAME).is_file()
        if locked:
            stack.enter_context(hold_run_lock(run_dir))
        return _run_owned(
            cfg, stack, locked, resume=resume, show_progress=show_progress, stop_after=stop_after
        )


def _run_owned(
    cfg: Config,
    stack: contextlib.ExitStack,
    locked: bool,
    *,
    resume: bool,
    show_progress: bool,
    stop_after: int | None,
) -> dict:
    """:func:`run` once ``output_dir``'s lock is held (``locked``) or the directory has no lock
    file yet (it is taken, in ``stack``, before anything is written)."""
    run_dir = Path(cfg.output_dir)
    restart = resume and stopped_before_first_checkpoint(run_dir)
    problems = check_run_inputs(cfg, resume=resume)
    allowed: list[str] = []
    if resume and not restart and not problems:
        allowed, finished = _check_resume(cfg, problems)
        if finished is not None and not problems:
            return {**finished, "already_finished": True}
    if problems:
        raise ConfigError("cannot start the run:\n" + "\n".join(f"  - {p}" for p in problems))
    parts = build_run(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not locked:  # the directory had no lock file: take the lock now
        stack.enter_context(hold_run_lock(run_dir))
        # another process may have run in the directory between the checks and the lock
        late = check_output_dir(cfg, resume=resume)
        if restart != (resume and stopped_before_first_checkpoint(run_dir)):
            late.append(f"output_dir = {cfg.output_dir!r}: changed by another process meanwhile")
        if late:
            raise ConfigError("cannot start the run:\n" + "\n".join(f"  - {p}" for p in late))
    if restart:
        _clear_for_restart(run_dir)
        resume = False
    if allowed:
        print("resume: changed settings (allowed):\n  " + "\n  ".join(allowed), file=sys.stderr)
        with open(run_dir / "resume_changes.jsonl", "a") as f:
            f.write(json.dumps({"changes": allowed}) + "\n")
    save_config(cfg, run_dir / "config.yaml")
    loop = TrainingLoop(parts, resume=resume, show_progress=show_progress)
    summary = loop.run(stop_after)
    if parts.lora and "stopped_at" not in summary:  # the run's end: its adapters, PEFT format
        parts.save_adapter(loop.state.params, run_dir / "adapter")
    return summary


# Bad input found at any point (a ConfigError once the data is known, a full disk, an
# unwritable path) is one line and exit 2, as for every entry point.
@cli_main
def main(argv: Sequence[str] | None = None, *, prog: str = "python -m train.finetune") -> int:
    cfg, args = parse_cli(argv, prog=prog)
    summary = run(cfg, resume=args.resume)
    if summary.get("already_finished"):
        print(
            f"the run in {cfg.output_dir} already finished at step {summary.get('steps')} "
            "(summary.json); nothing to resume, nothing changed"
        )
        return _exit_status(summary)
    if "stopped_at" in summary:
        signame = summary.get("signal", "SIGTERM")
        print(
            f"received {signame}: checkpointed step {summary['stopped_at']} in {cfg.output_dir}; "
            "continue with --resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED if signame == "SIGINT" else EXIT_PREEMPTED
    before = summary["initial_exact_match"]
    before = "" if before is None else f"{100 * before:.1f}% (base model) -> "
    print(
        f"[{summary['method']}] exact match ({summary['metric']}) {before}"
        f"{100 * summary['final_exact_match']:.1f}%, eval loss {summary['final_eval_loss']:.4f}, "
        f"on {summary['eval_examples']} held-out problems after {summary['steps']} steps "
        f"({summary['wall_time_s']:.0f} s); run directory: {cfg.output_dir}"
    )
    if summary.get("nonfinite"):
        print(
            f"the run's result is not finite: {summary.get('nonfinite_reason')} "
            f"(summary.json in {cfg.output_dir}); exit status {EXIT_NONFINITE}",
            file=sys.stderr,
        )
    return _exit_status(summary)


def _exit_status(summary: dict) -> int:
    if summary.get("diverged"):
        return EXIT_DIVERGED
    return EXIT_NONFINITE if summary.get("nonfinite") else 0
