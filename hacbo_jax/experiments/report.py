"""Figures and a markdown table for one or more run directories.

    python -m train.report RUN_DIR [RUN_DIR ...] [--out DIR]

Reads the run directory layout written by ``hacbo_jax.trainer.finetune`` (``metrics.jsonl``, ``eval.jsonl``,
``summary.json``, ``config.yaml``) and writes into ``--out`` (default: the single run directory,
or ``report/`` for several):

- ``loss.png``: training loss against step, every run;
- ``exact_match.png``: final exact match per run (bars);
- ``multipliers_<run>.png``: per-block update multiplier over time for each controlled run. For
  HACBO the logged multipliers are per (block, sub-module) and are SUMMED over sub-modules:
  sum_m L_active * w_b * v_{b,m} = L_active * w_b (v sums to 1 over m), the block's share of the
  update budget, on the same scale as BLAC's per-block multiplier L_active * w_b (1 = the
  uniform share). The probation damping gamma is not included (see the status figure);
- ``status_<run>.png``: blocks in probation (HACBO) / frozen (BLAC) against step;
- ``autolrs_<run>.png``: the chosen learning rate per stage and the candidates tried, for a run
  directory with an ``autolrs.json`` (written by ``hacbo-autolrs``);
- ``report.md``: a table (method, seed, steps, final loss, final EM, diverged, wall time,
  energy) with the figures.

The loading and plotting functions are reusable (``load_run``, ``plot_*``, ``summary_table``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import numpy as np
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hacbo_jax.trainer.cli_common import (  # noqa: E402
    ArgumentParser,
    add_overwrite_argument,
    check_output_target,
    cli_main,
)
from hacbo_jax.trainer.logs import EVAL_FILE, METRICS_FILE, SUMMARY_FILE  # noqa: E402

__all__ = [
    "Run",
    "RunDirError",
    "load_run",
    "plot_loss",
    "plot_exact_match",
    "plot_multipliers",
    "plot_status",
    "plot_autolrs_schedule",
    "summary_table",
    "write_report",
    "main",
]


class RunDirError(ValueError):
    """A run directory that cannot be reported on (missing or unreadable files)."""


@dataclasses.dataclass
class Run:
    """One run directory, loaded."""

    path: Path
    metrics: list[dict]
    evals: list[dict]
    summary: dict | None
    config: dict | None
    label: str = ""

    def __post_init__(self):
        if not self.label:
            self.label = f"{self.method}/seed{self.seed}" if self.seed is not None else self.method

    # fields of the table: summary.json first, else derived from the logs / config
    def _summary(self, key: str) -> Any:
        return (self.summary or {}).get(key)

    @property
    def method(self) -> str:
        return str(
            self._summary("method")
            or (self.config or {}).get("method")
            or self.controller_kind
            or self.path.name
        )

    @property
    def seed(self) -> int | None:
        seed = self._summary("seed")
        return seed if seed is not None else (self.config or {}).get("seed")

    @property
    def controller_kind(self) -> str | None:
        for row in self.metrics:
            if row.get("controller"):
                return row["controller"].get("kind")
        return ((self.config or {}).get("controller") or {}).get("kind")

    @property
    def steps(self) -> int | None:
        steps = self._summary("steps")
        return steps if steps is not None else (self.metrics[-1]["step"] if self.metrics else None)

    @property
    def final_loss(self) -> float | None:
        loss = self._summary("final_train_loss")
        if loss is None and self.metrics:
            loss = self.metrics[-1].get("loss")
        return loss

    @property
    def final_exact_match(self) -> float | None:
        em = self._summary("final_exact_match")
        if em is None and self.evals:
            em = self.evals[-1].get("exact_match")
        return em

    @property
    def diverged(self) -> bool:
        flag = self._summary("diverged")
        if flag is not None:
            return bool(flag)
        return any(not _finite(row.get("loss")) for row in self.metrics)

    @property
    def wall_time_s(self) -> float | None:
        return self._summary("wall_time_s")

    @property
    def energy(self) -> tuple[float | None, str | None]:
        kwh, source = self._summary("energy_kwh"), self._summary("energy_source")
        if kwh is None and self.summary is None:
            logged = [
                row.get("energy_kwh") for row in self.metrics if row.get("energy_kwh") is not None
            ]
            kwh = logged[-1] if logged else None
        return kwh, source

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a scalar metric; missing values are NaN."""
        steps = np.array([row["step"] for row in self.metrics], dtype=np.int64)
        values = np.array([_float(row.get(key)) for row in self.metrics], dtype=np.float64)
        return steps, values

    def controller_matrix(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(steps[T], values[B, T]) of a per-block controller statistic, or None.

        ``multipliers`` of HACBO ([B][M] per row) are summed over sub-modules; booleans become
        0/1. Rows without controller statistics are skipped.
        """
        steps, columns = [], []
        for row in self.metrics:
            stats = row.get("controller") or {}
            if stats.get(key) is None:
                continue
            values = np.asarray(stats[key], dtype=np.float64)
            if values.ndim == 2:
                values = values.sum(axis=1)
            steps.append(row["step"])
            columns.append(values)
        if not columns:
            return None
        if len({c.shape for c in columns}) != 1:
            raise RunDirError(
                f"{self.path / METRICS_FILE}: controller.{key} changes length between rows"
            )
        return np.asarray(steps), np.stack(columns, axis=1)


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


# metrics.jsonl fields the report plots or tabulates: numbers (or null) in every line.
_NUMERIC_METRICS = ("loss", "lr", "grad_norm", "update_norm", "tokens_per_s", "epoch")


def _read_run_jsonl(path: Path) -> list[Any]:
    """The JSON lines of a run's ``path``; a torn last line (a crash while writing) is skipped,
    any other line that is not JSON, or bytes that are not UTF-8, are a RunDirError naming the
    file and the line."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise RunDirError(f"{path}: not UTF-8 text (byte {e.start}); not a file a run wrote") from None
    lines = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = []
    for k, (number, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if k == len(lines) - 1 and not text.endswith("\n"):
                continue  # torn last line
            raise RunDirError(f"{path}: line {number} is not JSON ({e.msg})") from None
    return rows


def _read_run_json(path: Path) -> dict:
    """A run's JSON object file (summary.json): RunDirError naming it unless it is one."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RunDirError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise RunDirError(f"{path}: holds a JSON {type(value).__name__}, not the object a run writes")
    return value


def load_run(run_dir: str | Path) -> Run:
    """Load a run directory; RunDirError when it has no readable metrics.jsonl."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(
            f"{path}: not a directory (expected a run directory written by hacbo_jax.trainer.finetune)"
        )
    metrics_path = path / METRICS_FILE
    if not metrics_path.is_file():
        raise RunDirError(
            f"{path}: no {METRICS_FILE}; a run directory written by hacbo_jax.trainer.finetune "
            f"holds {METRICS_FILE}, {EVAL_FILE}, {SUMMARY_FILE} and config.yaml"
        )
    metrics = _read_run_jsonl(metrics_path)
    bad = [
        row for row in metrics if not isinstance(row, dict) or not isinstance(row.get("step"), int)
    ]
    if bad:
        raise RunDirError(f"{metrics_path}: every line needs an integer 'step', got {bad[0]!r}")
    for row in metrics:
        for key in _NUMERIC_METRICS:
            value = row.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                raise RunDirError(
                    f"{metrics_path}: step {row['step']}: {key!r} must be a number or null, "
                    f"got {value!r}"
                )
    metrics.sort(key=lambda row: row["step"])
    evals = _read_run_jsonl(path / EVAL_FILE) if (path / EVAL_FILE).is_file() else []
    if any(not isinstance(row, dict) for row in evals):
        raise RunDirError(f"{path / EVAL_FILE}: every line must be a JSON object")
    summary = config = None
    if (path / SUMMARY_FILE).is_file():
        summary = _read_run_json(path / SUMMARY_FILE)
    if (path / "config.yaml").is_file():
        try:
            config = yaml.safe_load((path / "config.yaml").read_bytes().decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            config = None
            print(
                f"warning: {path / 'config.yaml'}: not valid YAML ({e}); ignored", file=sys.stderr
            )
        if config is not None and not isinstance(config, dict):
            print(f"warning: {path / 'config.yaml'}: not a mapping; ignored", file=sys.stderr)
            config = None
    return Run(path=path, metrics=metrics, evals=evals, summary=summary, config=config)


def _unique_labels(runs: Sequence[Run]) -> None:
    """Make labels distinct: add the directory name, then a counter if still needed."""
    counts = Counter(run.label for run in runs)
    for run in runs:
        if counts[run.label] > 1:
            run.label = f"{run.label} ({run.path.name})"
    seen: Counter = Counter()
    for run in runs:
        seen[run.label] += 1
        if seen[run.label] > 1:
            run.label = f"{run.label} #{seen[run.label]}"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


# -- figures -------------------------------------------------------------------------------------


def plot_loss(runs: Sequence[Run], path: str | Path) -> Path:
    """Training loss against step for every run; an x marks a run's first non-finite loss."""
    fig, ax = plt.subplots(figsize=(7, 4))
    marked = False
    for run in runs:
        steps, loss = run.series("loss")
        (line,) = ax.plot(steps, loss, label=run.label, lw=1.5)
        bad = ~np.isfinite(loss)
        if bad.any():
            finite = loss[np.isfinite(loss)]
            y = finite[-1] if finite.size else 0.0
            ax.plot(
                steps[bad][0],
                y,
                "x",
                color=line.get_color(),
                ms=10,
                mew=2,
                label=None if marked else "first non-finite loss",
            )
            marked = True
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_exact_match(runs: Sequence[Run], path: str | Path) -> Path:
    """Final exact match (%) per run as bars; a diverged run's bar is hatched."""
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(runs) + 2), 4))
    values = [100 * (run.final_exact_match or 0.0) for run in runs]
    bars = ax.bar(range(len(runs)), values, color="tab:blue")
    for bar, run, value in zip(bars, runs, values):
        if run.diverged:
            bar.set_hatch("//")
            bar.set_facecolor("tab:red")
        text = "n/a" if run.final_exact_match is None else f"{value:.1f}"
        ax.annotate(
            text, (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8
        )
    ax.set_xticks(
        range(len(runs)), [run.label for run in runs], rotation=20, ha="right", fontsize=8
    )
    ax.set_ylabel("final exact match (%)")
    ax.set_ylim(0, max(values + [1.0]) * 1.15)
    return save_figure(fig, path)


def plot_multipliers(run: Run, path: str | Path) -> Path | None:
    """Heatmap block x step of the per-block multiplier (HACBO: summed over sub-modules)."""
    found = run.controller_matrix("multipliers")
    if found is None:
        return None
    steps, values = found
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.18 * values.shape[0] + 1.5)))
    mesh = ax.pcolormesh(
        steps, np.arange(values.shape[0]), values, shading="nearest", cmap="viridis"
    )
    fig.colorbar(mesh, ax=ax, label="block multiplier")
    what = (
        "Σ_m L_active·w_b·v_bm (summed over sub-modules)"
        if run.controller_kind == "hacbo"
        else "L_active·w_b"
    )
    ax.set_xlabel("step")
    ax.set_ylabel("block")
    ax.set_title(f"{run.label}: per-block update multiplier, {what}", fontsize=9)
    return save_figure(fig, path)


def plot_status(run: Run, path: str | Path) -> Path | None:
    """Blocks in probation (HACBO) or frozen (BLAC) against step."""
    key = "probation" if run.controller_kind == "hacbo" else "frozen"
    found = run.controller_matrix(key)
    if found is None:
        return None
    steps, values = found
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.18 * values.shape[0] + 1.5)))
    ax.pcolormesh(
        steps, np.arange(values.shape[0]), values, shading="nearest", cmap="Greys", vmin=0, vmax=1
    )
    ax.set_xlabel("step")
    ax.set_ylabel("block")
    ax.set_title(
        f"{run.label}: blocks {'in probation' if key == 'probation' else 'frozen'} "
        f"(black; {int(values[:, -1].sum())} of {values.shape[0]} at the end)",
        fontsize=10,
    )
    return save_figure(fig, path)


def plot_autolrs_schedule(driver: dict[str, Any], path: str | Path) -> Path:
    """The chosen learning rate against global step (steps at the chosen rate) and every
    candidate tried (grey dots at the stage's start), log scale."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for start, lr, tau in driver["schedule"]:
        ax.hlines(lr, start, start + tau, color="C0", linewidth=2)
    starts = {}
    for start, _, _ in driver["schedule"]:
        starts[len(starts)] = start
    for stage, lr, _, finite in driver["trials"]:
        x = starts.get(stage, driver["global_step"])
        ax.plot(x, lr, ".", color="0.5" if finite else "red", markersize=4)
    ax.set_yscale("log")
    ax.set_xlabel("global step (search + exploitation)")
    ax.set_ylabel("learning rate")
    ax.set_title("AutoLRS: chosen rate per stage (line), candidates (dots)", fontsize=9)
    return save_figure(fig, path)


def save_figure(fig, path, *, fit_outside_legend: bool = False) -> Path:
    """Saves and closes ``fig``; ``fit_outside_legend``: the saved area grows to hold a legend
    placed outside the axes (``bbox_inches="tight"``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight" if fit_outside_legend else None)
    plt.close(fig)
    return path


# -- table ---------------------------------------------------------------------------------------


def _cell(value: Any, fmt: str = "{}") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return fmt.format(value)


def summary_table(runs: Sequence[Run]) -> str:
    """Markdown table: one row per run."""
    lines = [
        "| run | method | seed | steps | final loss | final EM (%) | diverged | "
        "wall time (s) | energy (kWh) |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for run in runs:
        kwh, source = run.energy
        energy = "n/a" if kwh is None else f"{kwh:.4g}" + (f" ({source})" if source else "")
        em = run.final_exact_match
        lines.append(
            " | ".join(
                [
                    f"| {run.label}",
                    run.method,
                    _cell(run.seed),
                    _cell(run.steps),
                    _cell(run.final_loss, "{:.4f}"),
                    _cell(None if em is None else 100 * em, "{:.2f}"),
                    "yes" if run.diverged else "no",
                    _cell(run.wall_time_s, "{:.0f}"),
                    energy,
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def write_report(
    run_dirs: Sequence[str | Path], out_dir: str | Path | None = None, *, overwrite: bool = True
) -> Path:
    """Load the runs, write the figures and report.md into ``out_dir``; returns report.md.

    ``overwrite`` False: refuse (ValueError) a non-empty ``out_dir``, or, for the default target
    (the run directory, or report/ for several), one that already holds a report.md."""
    if not run_dirs:
        raise RunDirError("no run directory given")
    runs = [load_run(d) for d in run_dirs]
    _unique_labels(runs)
    out = (
        Path(out_dir)
        if out_dir is not None
        else (Path(run_dirs[0]) if len(runs) == 1 else Path("report"))
    )
    check_output_target(
        out, overwrite=overwrite, files=None if out_dir is not None else ["report.md"]
    )
    out.mkdir(parents=True, exist_ok=True)
    figures = [plot_loss(runs, out / "loss.png"), plot_exact_match(runs, out / "exact_match.png")]
    for run in runs:
        name = slug(run.label)
        figures.append(plot_multipliers(run, out / f"multipliers_{name}.png"))
        figures.append(plot_status(run, out / f"status_{name}.png"))
        if (run.path / "autolrs.json").is_file():  # a hacbo-autolrs run: its chosen schedule
            driver = json.loads((run.path / "autolrs.json").read_text())
            figures.append(plot_autolrs_schedule(driver, out / f"autolrs_{name}.png"))
    text = ["# Fine-tuning report", "", summary_table(runs)]
    text += [f"![{p.stem}]({p.name})" for p in figures if p is not None]
    report = out / "report.md"
    report.write_text("\n".join(text) + "\n")
    return report


@cli_main
def main(argv: Sequence[str] | None = None, *, prog: str = "python -m train.report") -> int:
    parser = ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default: the run directory, or report/ for several)",
    )
    add_overwrite_argument(parser, "an earlier report in the output directory")
    args = parser.parse_args(argv)
    report = write_report(args.run_dirs, args.out, overwrite=args.overwrite)
    print(f"wrote {report} and figures in {report.parent}")
    return 0
