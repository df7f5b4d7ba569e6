"""A run directory has one owner; an interrupted first save can be resumed; SIGINT checkpoints
like SIGTERM; a non-finite run never exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from hacbo_jax.trainer import finetune
from hacbo_jax.trainer.config import save_config
from hacbo_jax.trainer.run_lock import LOCK_NAME, try_lock
from support.runs import CONFIG, quick_config, quick_overrides

ROOT = Path(__file__).resolve().parents[2]
_HOLD = "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"


def cli(overrides, *flags) -> int:
    return finetune.main(["--config", str(CONFIG), *flags, *overrides])


def _hold_lock(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_run_directory_held_by_another_process_is_refused_at_once(
    tiny_model_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    holder = _hold_lock(out / LOCK_NAME)
    try:
        for flags in ((), ("--resume",)):
            assert cli(quick_overrides(tiny_model_dir, out), *flags) == 2
            err = capsys.readouterr().err
            assert str(out) in err and "another process holds" in err
            assert "Traceback" not in err
        assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    finally:
        holder.kill()
        holder.wait()
    # kill -9 of the holder releases the lock: the kernel drops it, no stale file to clean
    f = try_lock(out / LOCK_NAME)
    assert f is not None
    f.close()
    assert cli(quick_overrides(tiny_model_dir, out)) == 2  # the ordinary refusal again
    err = capsys.readouterr().err
    assert "another process" not in err and "--resume" in err


def test_the_lock_is_held_while_the_run_writes(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = []

    class Loop:
        def __init__(self, parts, *, resume, show_progress):
            pass

        def run(self, stop_after):
            seen.append(try_lock(out / LOCK_NAME))
            return {"stopped_at": 0}

    monkeypatch.setattr(finetune, "TrainingLoop", Loop)
    monkeypatch.setattr(finetune, "build_run", lambda cfg: SimpleNamespace(lora=None))
    assert finetune.run(quick_config(tiny_model_dir, out), show_progress=False) == {"stopped_at": 0}
    assert seen == [None]  # held during the run
    f = try_lock(out / LOCK_NAME)  # released after it
    assert f is not None
    f.close()


def _killed_in_first_save(tiny_model_dir, out: Path):
    """What a kill -9 during the first checkpoint save leaves: the config, logs, and orbax's
    temporary step directory, never renamed to ``checkpoints/5``."""
    cfg = quick_config(tiny_model_dir, out)
    out.mkdir()
    save_config(cfg, out / "config.yaml")
    (out / "metrics.jsonl").write_text('{"step": 2}\n{"step": 4}\n')
    tmp = out / "checkpoints" / "5.orbax-checkpoint-tmp-1712345678901234"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "half_written").write_bytes(b"\0" * 100)
    return cfg


def test_resume_after_a_killed_first_save_restarts_from_step_0(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    cfg = _killed_in_first_save(tiny_model_dir, out)
    # the plain command sends the user to --resume ...
    assert cli(quick_overrides(tiny_model_dir, out)) == 2
    assert "--resume" in capsys.readouterr().err
    # ... which restarts from step 0 there, keeping nothing half-written
    started = []

    class Loop:
        def __init__(self, parts, *, resume, show_progress):
            started.append(resume)
            assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "config.yaml"]

        def run(self, stop_after):
            return {"stopped_at": 1}

    monkeypatch.setattr(finetune, "TrainingLoop", Loop)
    monkeypatch.setattr(finetune, "build_run", lambda cfg: SimpleNamespace(lora=None))
    assert finetune.run(cfg, resume=True, show_progress=False) == {"stopped_at": 1}
    assert started == [False]
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "step 0" in err and str(out) in err


def test_resume_without_the_runs_files_is_still_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli(quick_overrides(tiny_model_dir, out), "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_resume_after_a_killed_first_save_trains(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _killed_in_first_save(tiny_model_dir, out)
    assert finetune.run(cfg, resume=True, show_progress=False, stop_after=1) == {"stopped_at": 1}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"]


# -- SIGINT ---------------------------------------------------------------------------------------

_DRIVER = """
import os, signal, sys
from hacbo_jax.trainer import loop, finetune
where = sys.argv.pop(1)
if where == "compile":  # the first step call compiles
    real_run = loop.TrainingLoop._steps
    def _steps(self, start, stop_after):
        ordinary, measurement, interval = self.parts.train_steps
        def first(inner):
            def step(*a):
                os.kill(os.getpid(), signal.SIGINT)
                return inner(*a)
            return step
        self.parts.train_steps = type(self.parts.train_steps)(first(ordinary), first(measurement), interval)
        return real_run(self, start, stop_after)
    loop.TrainingLoop._steps = _steps
else:  # during the (asynchronous) save of step 5
    real_save = loop.TrainingLoop.save_checkpoint
    def save_checkpoint(self, step):
        if step == 5 and not self.preempted:
            os.kill(os.getpid(), signal.SIGINT)
        real_save(self, step)
    loop.TrainingLoop.save_checkpoint = save_checkpoint
sys.exit(finetune.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("where, step", [("compile", 1), ("save", 5)])
def test_sigint_checkpoints_at_the_step_boundary(tiny_model_dir, tmp_path, where, step):
    out = tmp_path / where
    overrides = quick_overrides(tiny_model_dir, out, "eval.at_start=false")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, where, "--config", str(CONFIG), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == finetune.EXIT_INTERRUPTED, proc.stderr
    assert "Traceback" not in proc.stderr and "SIGINT" in proc.stderr
    assert (out / "checkpoints" / str(step)).is_dir() and not (out / "summary.json").exists()


# -- non-finite results ---------------------------------------------------------------------------


def _nan_params(monkeypatch):
    real = finetune.build_run

    def build(cfg):
        parts = real(cfg)
        params = jax.tree.map(lambda x: x * jnp.nan, parts.state.params)
        parts.state = parts.state._replace(params=params)
        return parts

    monkeypatch.setattr(finetune, "build_run", build)


@pytest.mark.slow
def test_a_run_with_nan_parameters_never_exits_0(tiny_model_dir, tmp_path, monkeypatch, capsys):
    _nan_params(monkeypatch)
    out = tmp_path / "nan"
    changed = {
        "optim.max_steps": "3",
        "optim.warmup_steps": "1",
        "logging.every": "1",
        "checkpoint.every": "5",
        "controller.kind": "none",
        "divergence.max_consecutive_nonfinite": "100",
    }
    overrides = [
        o for o in quick_overrides(tiny_model_dir, out) if o.split("=")[0] not in changed
    ] + [f"{k}={v}" for k, v in changed.items()]
    assert cli(overrides) == finetune.EXIT_NONFINITE
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nonfinite"] and not summary["diverged"]
    assert "no finite step" in summary["nonfinite_reason"]
    assert "non-finite parameters" in summary["nonfinite_reason"]
    assert "not finite" in capsys.readouterr().err
    assert cli(overrides, "--resume") == finetune.EXIT_NONFINITE  # already finished: same status
