"""The training loop: step, then run the hooks that are due (logging, divergence, micro-dev
refresh, evaluation, checkpointing), then the final evaluation and the summary.

The checkpointer, the logger and the energy meter are opened in one ``ExitStack``: an exception
anywhere closes them. Checkpoints hold the state, the data position, the micro-dev buffer and the
run's counters, so ``resume=True`` continues bit-exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from hacbo_jax.data import gsm8k as data_lib
from hacbo_jax.trainer.checkpoint import Checkpointer, CheckpointError
from hacbo_jax.trainer.config import ConfigError
from hacbo_jax.trainer.controller_registry import (
    controller_stats,
    controller_warning,
    find_controller_state,
)
from hacbo_jax.trainer.energy import EnergyMeter
from hacbo_jax.trainer.logs import RunLogger
from hacbo_jax.trainer.run_parts import RunParts

__all__ = ["TrainingLoop"]


# A controller's warning (HACBO starvation, AdaGradSelect lock-in) is printed once it has held at
# this many log points in a row.
WARN_AFTER_LOG_POINTS = 3


@dataclasses.dataclass
class _Interval:
    """Host-side bookkeeping between two logging points."""

    start: float
    tokens: int = 0
    pending: list = dataclasses.field(default_factory=list)
    # Losses of the interval's finite steps taken before a resume (from the checkpoint), so
    # that the first record after a resume averages the same steps as a straight run's.
    carried_losses: list = dataclasses.field(default_factory=list)


class TrainingLoop:
    """Runs :class:`RunParts` from step 0 (or the latest checkpoint) to the end of the run."""

    def __init__(self, parts: RunParts, *, resume: bool, show_progress: bool = True):
        self.parts, self.cfg = parts, parts.cfg
        self.run_dir = Path(self.cfg.output_dir)
        self.resume, self.show_progress = resume, show_progress
        self.wall_start = time.perf_counter()
        self.state = parts.state
        self.warning_streak = 0  # consecutive log points at which the controller warned
        self.counters: dict[str, Any] = {
            "wall_time_s": 0.0,
            # the training clock: wall time minus evaluation and checkpoint writes (the same
            # for every method), so exact match can be compared at equal compute time; it
            # includes compilation, the controller's dev passes and micro-dev refreshes
            "train_time_s": 0.0,
            # the same interval in this process's CPU seconds (all threads): barely moved by
            # other jobs on a shared machine, unlike the wall clock
            "train_cpu_s": 0.0,
            "eval_time_s": 0.0,
            "energy_kwh": 0.0,
            "refreshes": [],
            "initial_exact_match": None,
        }
        self.last_loss, self.diverged = math.nan, False
        self.preempted = False
        self.stop_signal: str | None = None  # "SIGTERM" / "SIGINT": stop at the step boundary
        self.interval = _Interval(time.perf_counter())

    # ---- resources ---------------------------------------------------------------------
    def _open(self, stack: contextlib.ExitStack) -> int:
        """Opens checkpointer, logger and energy meter; restores a checkpoint; the start step."""
        cfg, parts = self.cfg, self.parts
        self.ckpt = stack.enter_context(
            Checkpointer(self.run_dir / "checkpoints", keep=cfg.checkpoint.keep)
        )
        start_step = 0
        if self.resume:
            start_step = self._restore_newest_good()
        self.logger = stack.enter_context(
            RunLogger(
                self.run_dir,
                tensorboard=cfg.logging.tensorboard,
                wandb=cfg.logging.wandb,
                resume_step=start_step if self.resume else None,
                config=dataclasses.asdict(cfg),
            )
        )
        if cfg.eval.at_start and not self.resume:
            initial, initial_loss = self.evaluate(0, epoch=0.0)
            self.counters["initial_exact_match"] = initial.exact_match
            self.counters["initial_eval_loss"] = initial_loss
        self.dev_buffer = parts.device_dev_buffer()
        self.energy = EnergyMeter()
        self.energy.start()
        stack.callback(self.energy.stop)
        return start_step

    def _restore_newest_good(self) -> int:
        """Restores the newest checkpoint that reads back cleanly; says which ones it skipped
        and why. ConfigError when none does."""
        parts, skipped = self.parts, []
        for step in reversed(self.ckpt.all_steps()):
            try:
                self.state, meta = self.ckpt.restore(step, abstract_target=self.state)
            except CheckpointError as e:
                skipped.append(f"checkpoint step {step}: {e}")
                print(f"resume: skipped checkpoint step {step}: {e}", file=sys.stderr)
                continue
            if skipped:
                print(f"resume: continuing from checkpoint step {step}", file=sys.stderr)
            parts.sampler.position = data_lib.DataPosition(*meta["data_position"])
            parts.buffer.load_state_dict(meta["microdev"])
            # checkpoints written before the training clock existed resume with it at 0
            self.counters = {
                "train_time_s": 0.0,
                "train_cpu_s": 0.0,
                "eval_time_s": 0.0,
                **meta["counters"],
            }
            self.interval.carried_losses = list(meta.get("interval_losses", []))
            return step
        raise ConfigError(
            f"--resume: no checkpoint in {self.run_dir / 'checkpoints'} can be restored:\n  - "
            + "\n  - ".join(skipped or ["none found"])
        )

    # ---- hooks -------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> None:
        kwh, _, _ = self.energy.read()
        meta = {
            "data_position": list(self.parts.sampler.position),
            "microdev": {
                k: (v.tolist() if isinstance(v, np.ndarray) else v)
                for k, v in self.parts.buffer.state_dict().items()
            },
            "interval_losses": self.interval.carried_losses
            + [float(m.loss) for m in jax.device_get(self.interval.pending) if bool(m.finite)],
            "counters": {
                **self.counters,
                "wall_time_s": self.counters["wall_time_s"] + time.perf_counter() - self.wall_start,
                "energy_kwh": self.counters["energy_kwh"] + (kwh or 0.0),
            },
        }
        self.ckpt.save(step, self.state, meta)

    def log_metrics(self, step: int, interval: _Interval) -> None:
        fetched = jax.device_get(interval.pending)
        elapsed = time.perf_counter() - interval.start
        finite_losses = interval.carried_losses + [float(m.loss) for m in fetched if bool(m.finite)]
        self.last_loss = float(np.mean(finite_losses)) if finite_losses else math.nan
        kwh, _, _ = self.energy.read()
        controller = self.cfg.controller
        record = {
            "step": step,
            "epoch": self.parts.sampler.epoch_fraction,
            "loss": self.last_loss,
            "lr": float(fetched[-1].learning_rate),
            "grad_norm": float(fetched[-1].grad_norm),
            "update_norm": float(fetched[-1].update_norm),
            "tokens_per_s": interval.tokens / max(elapsed, 1e-9),
            "skipped_steps": int(fetched[-1].total_nonfinite),
            "energy_kwh": None if kwh is None else self.counters["energy_kwh"] + kwh,
            "controller": controller_stats(controller.kind, controller.hyper, self.state.opt_state),
        }
        self.skipped_total = record["skipped_steps"]
        warning = self.persistent_warning(
            controller_warning(controller.kind, controller.hyper, self.state.opt_state)
        )
        if warning is not None:
            record["warning"] = warning
        self.logger.log_metrics(step, record)
        self.progress.set_postfix(loss=f"{self.last_loss:.4f}", skipped=record["skipped_steps"])

    def persistent_warning(self, text: str | None) -> str | None:
        """``text`` once it has held at WARN_AFTER_LOG_POINTS log points in a row: printed once
        per run (a transient at one measurement is not worth a user's attention)."""
        self.warning_streak = self.warning_streak + 1 if text else 0
        if text is None or self.warning_streak != WARN_AFTER_LOG_POINTS:
            return None
        tqdm.write(f"warning: {text}", file=sys.stderr)
        return text

    def refresh_microdev(self, step: int) -> None:
        parts = self.parts

        def solve_fn(pool_indices, params_=self.state.params):
            return parts.evaluate(params_, [parts.task.pool[i] for i in pool_indices]).correct

        stats = parts.buffer.refresh(step, solve_fn)
        self.counters["refreshes"].append(stats._asdict())
        self.dev_buffer = parts.device_dev_buffer()

    def evaluate(self, step: int, epoch: float | None = None):
        """Scores the eval split (configured metric, greedy) and its teacher-forced loss; logs
        both to eval.jsonl with the number of generation programs this evaluation compiled.
        Returns ``(EvalResult, eval_loss)``."""
        from hacbo_jax.models.generation import compiled_program_count

        parts = self.parts
        started = time.perf_counter()
        programs_before = compiled_program_count()
        result = parts.evaluate(self.state.params, parts.task.eval)
        programs = compiled_program_count() - programs_before
        eval_loss = parts.eval_loss(self.state.params) if parts.eval_loss else math.nan
        self.counters["generation_programs"] = (
            self.counters.get("generation_programs", 0) + programs
        )
        self.logger.log_eval(
            step,
            exact_match=result.exact_match,
            n=result.num_examples,
            epoch=parts.sampler.epoch_fraction if epoch is None else epoch,
            eval_loss=eval_loss,
            metric=parts.metric,
            programs_compiled=programs,
            train_time_s=self.counters["train_time_s"],
            train_cpu_s=self.counters["train_cpu_s"],
        )
        self.counters["eval_time_s"] += time.perf_counter() - started
        return result, eval_loss

    # ---- the loop ----------------------------------------------------------------------
    def _steps(self, start_step: int, stop_after: int | None) -> int | None:
        """Steps from ``start_step + 1``; returns the step it stopped at for ``stop_after``."""
        cfg, parts, total = self.cfg, self.parts, self.parts.total_steps
        limit = cfg.divergence.max_consecutive_nonfinite
        found = find_controller_state(self.state.opt_state)
        controller_count = 0 if found is None else int(jax.device_get(found.count))
        for step in range(start_step + 1, total + 1):
            step_started, step_cpu = time.perf_counter(), _process_cpu_seconds()
            batch, tokens = parts.device_batch(parts.sampler.next_indices())
            interval = self.interval
            interval.tokens += tokens
            step_fn = parts.train_steps.pick(controller_count)
            self.state, metrics = step_fn(self.state, batch, self.dev_buffer)
            interval.pending.append(metrics)
            self.progress.update(1)
            # One small device->host read per step serves both the choice of the next step
            # function (the controller's count advances only on applied steps) and the exact
            # divergence stop (the streak is counted inside the step,
            # ApplyIfFiniteState.notfinite_count, so the run stops exactly at the N-th
            # consecutive skipped step). The read waits for the step to finish, so the host
            # builds the next batch after the step rather than during it: a gather of
            # pre-tokenized rows, small next to a step on any device (not measured on a GPU).
            controller_count, consecutive = map(
                int, jax.device_get((metrics.controller_count, metrics.consecutive_nonfinite))
            )
            self.diverged = self.diverged or consecutive >= limit
            if step % cfg.logging.every == 0 or step == total or self.diverged:
                self.log_metrics(step, interval)
                self.interval = _Interval(time.perf_counter())
            if self.diverged:
                self.save_checkpoint(step)
                return None
            if parts.measures and cfg.microdev.refresh_every and parts.buffer.due(step):
                self.refresh_microdev(step)
            self.counters["train_time_s"] += time.perf_counter() - step_started
            self.counters["train_cpu_s"] += _process_cpu_seconds() - step_cpu
            epoch_done = step % parts.sampler.batches_per_epoch == 0
            every_n = cfg.eval.every is not None and step % cfg.eval.every == 0
            if ((cfg.eval.every_epoch and epoch_done) or every_n) and step != total:
                self.evaluate(step)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                self.save_checkpoint(step)
            if self.preempted or (stop_after is not None and step >= stop_after):
                self.save_checkpoint(step)
                return step
        return None

    def _on_stop_signal(self, signum, frame) -> None:
        """SIGTERM (pre-emption notice) or SIGINT (Ctrl-C): finish the current step (and a save
        or compilation under way), checkpoint at the step boundary, return (see ``run``). The
        handler only sets a flag: no KeyboardInterrupt is raised into JAX or orbax, where it
        could be swallowed (a GC callback) or leave a save half-done. A second SIGINT aborts
        at once, with the shell's status of a process killed by SIGINT (130)."""
        name = signal.Signals(signum).name
        if self.preempted and signum == signal.SIGINT and self.stop_signal == "SIGINT":
            print("second SIGINT: aborting now, without a checkpoint", file=sys.stderr)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            return
        if not self.preempted:
            self.stop_signal = name
            print(
                f"\nreceived {name}: the run will checkpoint at the next step boundary and stop"
                + (" (press Ctrl-C again to abort at once, without a checkpoint)"
                   if signum == signal.SIGINT else ""),
                file=sys.stderr,
            )
        self.preempted = True

    def _install_signal_handlers(self, stack: contextlib.ExitStack) -> None:
        """SIGTERM and SIGINT go to :meth:`_on_stop_signal` for the whole run; the previous
        handlers come back when it ends (only the main thread may install handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.signal(signum, self._on_stop_signal)
            if previous is not None:  # None: installed outside Python, cannot be restored
                stack.callback(signal.signal, signum, previous)

    def run(self, stop_after: int | None = None) -> dict:
        """The whole run; the summary (also written to ``summary.json``), or ``{"stopped_at":
        step}`` when ``stop_after`` stopped it early (as a pre-empted job would)."""
        with contextlib.ExitStack() as stack:
            # before the restore, the first evaluation and compilation: a signal during any of
            # them stops the run at the first step boundary
            self._install_signal_handlers(stack)
            start_step = self._open(stack)
            self.progress = tqdm(
                total=self.parts.total_steps,
                initial=start_step,
                disable=not self.show_progress,
                desc=f"{self.cfg.method or self.cfg.controller.kind}",
                dynamic_ncols=True,
            )
            stack.callback(self.progress.close)
            self.skipped_total = int(jax.device_get(self.state.opt_state.total_notfinite))
            stopped_at = self._steps(start_step, stop_after)
            if stopped_at is not None:
                self.ckpt.wait()
                if self.preempted:
                    return {
                        "stopped_at": stopped_at,
                        "preempted": True,
                        "signal": self.stop_signal or "SIGTERM",
                    }
                return {"stopped_at": stopped_at}
            return self._finish()

    def _finish(self) -> dict:
        cfg, parts = self.cfg, self.parts
        final_step = int(self.state.step)
        if self.diverged:
            print(
                f"run stopped at step {final_step}: {cfg.divergence.max_consecutive_nonfinite} or "
                "more consecutive non-finite losses/gradients (skipped, params untouched); the last"
                f" good state is checkpointed in {self.run_dir / 'checkpoints'}",
                file=sys.stderr,
            )
        else:
            self.save_checkpoint(final_step)
        result, eval_loss = self.evaluate(final_step)
        rows = zip(parts.task.eval, result.predictions, result.correct)
        (self.run_dir / "predictions.jsonl").write_text(
            "".join(
                json.dumps(
                    {
                        "question": e.question,
                        "reference": e.answer,
                        "prediction": p,
                        "correct": bool(c),
                    }
                )
                + "\n"
                for e, p, c in rows
            )
        )
        if cfg.checkpoint.export_hf:
            export_dir = self.run_dir / "hf_model"
            parts.model_at(self.state.params).save_pretrained(export_dir)
            parts.tokenizer.save_pretrained(export_dir)
        nonfinite_reason = self._nonfinite_reason(final_step, eval_loss)
        if nonfinite_reason is not None:
            print(f"run ended with a non-finite result: {nonfinite_reason}", file=sys.stderr)
        kwh, source, mean_watts = self.energy.read()
        stats = controller_stats(cfg.controller.kind, cfg.controller.hyper, self.state.opt_state)
        summary = {
            "method": cfg.method or cfg.controller.kind,
            "seed": cfg.seed,
            "steps": final_step,
            "total_steps": parts.total_steps,
            "initial_exact_match": self.counters["initial_exact_match"],
            "final_exact_match": result.exact_match,
            "metric": parts.metric,
            "initial_eval_loss": self.counters.get("initial_eval_loss"),
            "final_eval_loss": eval_loss,
            "eval_examples": result.num_examples,
            # generation programs compiled by this run's evaluations (same shapes: one)
            "generation_programs": self.counters.get("generation_programs", 0),
            "final_train_loss": self.last_loss,
            "diverged": self.diverged,
            # the run reached its end but its result is not usable (finetune.EXIT_NONFINITE)
            "nonfinite": nonfinite_reason is not None,
            "nonfinite_reason": nonfinite_reason,
            "skipped_steps": self.skipped_total,
            "train_examples": len(parts.task.train),
            "train_truncated": parts.train_arrays.num_truncated,
            "microdev_refreshes": len(self.counters["refreshes"]),
            # examples the refreshes swapped into the buffer, all refreshes together
            "microdev_replaced": sum(r["num_replaced"] for r in self.counters["refreshes"]),
            "wall_time_s": self.counters["wall_time_s"] + time.perf_counter() - self.wall_start,
            "train_time_s": self.counters["train_time_s"],
            "train_cpu_s": self.counters["train_cpu_s"],
            "eval_time_s": self.counters["eval_time_s"],
            "energy_kwh": None if kwh is None else self.counters["energy_kwh"] + kwh,
            "energy_source": source,
            "mean_power_w": mean_watts,
            "controller": _controller_summary(stats),
        }
        self.ckpt.wait()  # the final checkpoint is on disk before the run counts as finished
        self.logger.write_summary(summary)
        return summary

    def _nonfinite_reason(self, final_step: int, eval_loss: float) -> str | None:
        """Why the finished run's result is not finite, or None: no step had a finite loss and
        gradient, or the final training loss, eval loss or parameters are NaN/inf. (A diverged
        run is reported as such: its parameters are the last good ones.)"""
        if self.diverged:
            return None
        reasons = []
        applied = final_step - self.skipped_total
        if final_step > 0 and applied <= 0:
            reasons.append(
                f"no finite step: all {final_step} steps had a non-finite loss or gradient and "
                "were skipped (parameters never updated)"
            )
        bad = [
            jax.tree_util.keystr(path, simple=True, separator="/")
            for path, leaf in jax.tree_util.tree_flatten_with_path(self.state.params)[0]
            if jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact)
            and not bool(jax.device_get(jax.numpy.isfinite(leaf).all()))
        ]
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            reasons.append(f"non-finite parameters: {', '.join(bad[:5])}{more}")
        if final_step > 0 and not math.isfinite(self.last_loss):
            reasons.append(f"final training loss {self.last_loss}")
        if self.parts.eval_loss is not None and not math.isfinite(eval_loss):
            reasons.append(f"final eval loss {eval_loss}")
        return "; ".join(reasons) or None


def _process_cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads."""
    t = os.times()
    return t.user + t.system


def _controller_summary(stats: dict | None) -> dict | None:
    """The controller's end-of-run counters for ``summary.json`` (None without a controller)."""
    if stats is None:
        return None
    keys = ("missed_measurements", "skipped_measurements", "all_frozen_steps", "counts")
    summary = {"kind": stats["kind"], **{k: stats[k] for k in keys if k in stats}}
    if "all_frozen" in stats:
        summary["all_frozen"] = stats["all_frozen"]
        if stats["all_frozen"]:
            summary["note"] = (
                "every block is frozen at the end of the run: no controlled parameter trained on "
                f"the last {stats['all_frozen_steps']} applied steps"
            )
    return summary
