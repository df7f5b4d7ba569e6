"""Run logs: JSON lines in the run directory, optionally mirrored to TensorBoard and W&B (offline).

Files (see the run directory layout in the project notes):

- ``RUN_DIR/metrics.jsonl``: one object per logging step, ``{"step": int, ...metrics}``;
- ``RUN_DIR/eval.jsonl``: one object per evaluation, ``{"step", "epoch", "exact_match", "n"}``;
- ``RUN_DIR/summary.json``: written once at the end (:meth:`RunLogger.write_summary`).

Every line is flushed when written, so a crash loses at most the line being written. numpy / jax
scalars and arrays become JSON numbers / lists; non-finite floats are written as ``NaN`` /
``Infinity`` (Python's json reads them back) because a diverged loss must stay visible.
On resume, lines with ``step`` greater than the checkpoint's step are removed, because the run
repeats those steps and would otherwise log them twice.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["RunLogger", "read_jsonl", "jsonable"]

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
SUMMARY_FILE = "summary.json"


def jsonable(value: Any) -> Any:
    """JSON-ready copy: numpy/jax scalars -> Python numbers, arrays -> (nested) lists."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)) or type(value).__module__.startswith("jax"):
        return np.asarray(value).tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All complete JSON lines of ``path`` (a torn last line from a crash is skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _truncate_after(path: Path, step: int) -> None:
    """Keep only complete lines with ``step <= step`` (atomic rewrite)."""
    if not path.exists():
        return
    kept = [
        row for row in read_jsonl(path) if isinstance(row.get("step"), int) and row["step"] <= step
    ]
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in kept)
    os.replace(tmp, path)


def _scalars(prefix: str, value: Any, out: dict[str, float]) -> dict[str, float]:
    """Flatten nested mappings to ``{"a/b": float}``, keeping numeric scalars only."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _scalars(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = float(value)
    return out


class RunLogger:
    """Append metrics and evaluations of one run to JSON lines (plus optional mirrors).

    Args:
      run_dir: the run directory (created if missing).
      tensorboard: also write TensorBoard scalars to ``RUN_DIR/tensorboard`` via ``tensorboardX``
        (warns and continues without it when not installed; torch is never imported here).
      wandb: also log scalars to Weights & Biases in offline mode (``RUN_DIR/wandb``), when
        ``wandb`` is installed (else warns).
      resume_step: None for a new run (existing log files are started afresh); the restored
        checkpoint step on resume (lines with a larger step are dropped).
      config: a plain dict stored with the W&B run.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        tensorboard: bool = False,
        wandb: bool = False,
        resume_step: int | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.eval_path = self.run_dir / EVAL_FILE
        for path in (self.metrics_path, self.eval_path):
            if resume_step is None:
                path.unlink(missing_ok=True)
            else:
                _truncate_after(path, int(resume_step))
        self._metrics = open(self.metrics_path, "a")
        self._eval = open(self.eval_path, "a")
        self._tb = self._open_tensorboard() if tensorboard else None
        self._wandb = self._open_wandb(config, resume_step is not None) if wandb else None

    def _open_tensorboard(self):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            warnings.warn(
                "logging.tensorboard is true but tensorboardX is not installed "
                "(pip install tensorboardX); TensorBoard logging is off",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        return SummaryWriter(logdir=str(self.run_dir / "tensorboard"))

    def _open_wandb(self, config, resumed: bool):
        try:
            import wandb
        except ImportError:
            warnings.warn(
                "logging.wandb is true but wandb is not installed (pip install wandb); "
                "W&B logging is off",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        return wandb.init(
            mode="offline",
            dir=str(self.run_dir),
            name=self.run_dir.name,
            config=dict(config or {}),
            resume="allow" if resumed else None,
        )

    @staticmethod
    def _write(f, row: dict) -> None:
        f.write(json.dumps(row) + "\n")
        f.flush()

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append ``{"step": step, **metrics}`` to metrics.jsonl (and mirror scalars)."""
        row = {"step": int(step), **jsonable(dict(metrics))}
        self._write(self._metrics, row)
        self._mirror(int(step), {k: v for k, v in row.items() if k != "step"}, "train")

    def log_eval(
        self, step: int, *, exact_match: float, n: int, epoch: float | None = None, **extra: Any
    ) -> None:
        """Append ``{"step", "epoch", "exact_match", "n", **extra}`` to eval.jsonl."""
        row = {
            "step": int(step),
            "epoch": epoch,
            "exact_match": float(exact_match),
            "n": int(n),
            **jsonable(extra),
        }
        self._write(self._eval, row)
        self._mirror(int(step), {"exact_match": row["exact_match"]}, "eval")

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        """Write RUN_DIR/summary.json atomically; returns its path."""
        path = self.run_dir / SUMMARY_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(jsonable(dict(summary)), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    def _mirror(self, step: int, values: Mapping[str, Any], prefix: str) -> None:
        if self._tb is None and self._wandb is None:
            return
        scalars = _scalars(prefix, values, {})  # per-block lists stay in the JSON lines only
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flush and close every sink."""
        for f in (self._metrics, self._eval):
            if not f.closed:
                f.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
