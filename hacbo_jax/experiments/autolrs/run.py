"""AutoLRS as a training method: AdamW (optionally with the configured controller after it)
whose learning rate :func:`~hacbo_jax.experiments.autolrs.autolrs_run` chooses, on the run :func:`build_run` builds.

    hacbo-autolrs --config tiny_cpu [key=value ...] [--resume]
    python -m train.autolrs --config tiny_cpu ...        (from a checkout)

Its own entry rather than a ``method`` of ``hacbo-finetune``: AutoLRS restores the whole train
state k + 1 times per stage, which the step-and-hooks loop of :mod:`hacbo_jax.trainer.loop`
does not do. It reuses every part of the run (:func:`~hacbo_jax.trainer.run_parts.build_run`
with ``inject_lr=True``: the rate lives in AdamW's ``inject_hyperparams`` state, so changing it
never recompiles): the model, data sampler, micro-dev buffer, the compiled step (the measuring
one, so a controller such as HACBO measures when due: ``controller.kind=hacbo`` is
"autolrs + HACBO", ``controller.kind=none`` plain AutoLRS), the checkpointer and the final
evaluation. The stage lengths are the config's ``autolrs`` section (the code's, scaled down).

Every ``checkpoint.every`` steps (and at the end) a checkpoint holds the train state, the
stage's snapshot (the train state again outside a search) and, as JSON meta, the driver's state
(:class:`~hacbo_jax.experiments.autolrs.AutoLRSState`) and the data position, so ``--resume`` continues the same
stage step for step. The run directory gets ``metrics.jsonl`` (step, phase, stage,
learning rate, loss every ``logging.every`` steps), ``autolrs.json`` (the driver state: chosen
schedule, every trial) and ``autolrs_schedule.png``, the chosen schedule.

The train state is donated by the step, so the driver copies its snapshot
(``copy_snapshot=True``). The validation loss (validation-loss mode) is the mean answer NLL on
the first ``microdev.batch_size`` examples of the micro-dev pool.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hacbo_jax.experiments.autolrs.algorithm import AutoLRSState, autolrs_run
from hacbo_jax.data import gsm8k as data_lib
from hacbo_jax.trainer import distributed
from hacbo_jax.trainer.checkpoint import Checkpointer
from hacbo_jax.trainer.cli_common import cli_main
from hacbo_jax.trainer.config import Config, ConfigError, parse_cli, save_config
from hacbo_jax.experiments.report import plot_autolrs_schedule
from hacbo_jax.trainer.run_parts import RunParts, arrays_of, build_run
from hacbo_jax.trainer.step import Batch, make_loss_fn

__all__ = ["main", "run"]


def _eval_fn(parts: RunParts):
    """state -> mean answer NLL on a fixed slice of the micro-dev pool (jitted)."""
    cfg = parts.cfg
    rows = np.arange(min(cfg.microdev.batch_size, len(parts.task.pool)))
    batch = Batch(*(jnp.asarray(x) for x in arrays_of(parts.pool_arrays.take(rows))))
    loss_fn = make_loss_fn(parts.graphdef, parts.rest, logits_chunk=cfg.model.logits_chunk)

    @jax.jit
    def val_loss(params):
        total, count = loss_fn(params, batch)
        return total / jnp.maximum(count, 1.0)

    return lambda state: val_loss(state.params)


def _boundaries(cfg: Config, total: int, stop_after: int | None) -> list[int]:
    """Steps at which a checkpoint is written (chunks of ``autolrs_run``)."""
    every = cfg.checkpoint.every
    points = set(range(every, total, every)) if every else set()
    if stop_after is not None:
        points.add(min(stop_after, total))
    points.add(total)
    return sorted(points)


def run(cfg: Config, *, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Runs (or resumes) AutoLRS on the run ``cfg`` describes for ``total_steps`` global steps
    (search steps included); the summary (also ``summary.json``), or ``{"stopped_at": step}``."""
    distributed.maybe_initialize()
    config = cfg.autolrs.build()
    parts = build_run(cfg, inject_lr=True)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    state, driver, snapshot = parts.state, None, None
    log_path = run_dir / "metrics.jsonl"
    with Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep) as ckpt:
        if resume:
            latest = ckpt.latest_step()
            if latest is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
            (state, saved_snapshot), meta = ckpt.restore(latest, abstract_target=(state, state))
            parts.sampler.position = data_lib.DataPosition(*meta["data_position"])
            driver = AutoLRSState.from_dict(meta["autolrs"])
            snapshot = saved_snapshot if driver.needs_snapshot else None
        elif log_path.exists():
            log_path.unlink()
        dev_buffer = parts.device_dev_buffer()

        def step_fn(state, batch):
            state, metrics = parts.train_step(state, batch, dev_buffer)
            return state, metrics.loss

        def batches() -> Iterator[Batch]:
            while True:
                yield parts.device_batch(parts.sampler.next_indices())[0]

        batch_iter = batches()
        log = open(log_path, "a")

        def on_step(d: AutoLRSState, loss) -> None:
            if d.global_step % cfg.logging.every == 0:
                row = {"step": d.global_step, "phase": d.phase, "stage": d.stage, "lr": d.lr}
                log.write(json.dumps({**row, "loss": float(loss)}) + "\n")
                log.flush()  # one line per logging step, readable while the run goes on

        done = 0 if driver is None else driver.global_step
        try:
            for target in _boundaries(cfg, parts.total_steps, stop_after):
                if target <= done:
                    continue
                state, driver, snapshot = autolrs_run(
                    step_fn,
                    _eval_fn(parts),
                    state,
                    batch_iter,
                    config,
                    num_steps=target,
                    driver=driver,
                    snapshot=snapshot,
                    copy_snapshot=True,
                    on_step=on_step,
                )
                done = driver.global_step
                meta = {
                    "data_position": list(parts.sampler.position),
                    "autolrs": driver.to_dict(),
                }
                kept = snapshot if driver.needs_snapshot else state
                ckpt.save(done, (state, kept), meta)
                if stop_after is not None and done >= stop_after and done < parts.total_steps:
                    ckpt.wait()
                    return {"stopped_at": done}
        finally:
            log.close()
        ckpt.wait()
    (run_dir / "autolrs.json").write_text(json.dumps(driver.to_dict(), indent=1))
    plot_autolrs_schedule(driver.to_dict(), run_dir / "autolrs_schedule.png")
    result = parts.evaluate(state.params, parts.task.eval)
    summary = {
        "method": cfg.method or "autolrs",
        "seed": cfg.seed,
        "steps": driver.global_step,
        "effective_steps": driver.effective_step,
        "total_steps": parts.total_steps,
        "final_exact_match": result.exact_match,
        "eval_examples": result.num_examples,
        "schedule": driver.schedule,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


@cli_main
def main(argv: Sequence[str] | None = None, *, prog: str = "hacbo-autolrs") -> int:
    cfg, args = parse_cli(argv, prog=prog, description="AutoLRS-driven AdamW fine-tuning")
    summary = run(cfg, resume=args.resume)
    print(
        f"[autolrs] exact match {100 * summary['final_exact_match']:.1f}% after "
        f"{summary['steps']} steps ({summary['effective_steps']} at chosen rates); schedule "
        f"{summary['schedule']}; run directory: {cfg.output_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
