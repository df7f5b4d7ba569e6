"""``results/evidence/``: ``summary.json`` first, then ``report.md`` and the figures from it.

Reads the run directories ``train.evidence`` wrote under ``OUT/`` (whatever has finished):

- ``methods``: final exact match (%) per seed of every budget-part method, its mean and 95% t
  interval, and its tuned rate;
- ``comparisons``: paired t-tests over the seeds, every pair of the budget-part methods, with
  Benjamini-Hochberg adjusted p-values over the whole family
  (``scipy.stats.false_discovery_control``), the mean difference with scipy's 95% interval, the
  paired effect size d_z with its exact 95% interval and the seeds a test would need to detect
  the observed d_z with 80% power at alpha 0.05;
- ``gains``: each method minus the base model (one-sample t over the seeds);
- ``equal_time``: exact match of every method at the training CPU time of the longest AdamW
  run (each run's last evaluation at or before it);
- ``stability``: per (method, lr, budget) the seeds, diverged runs (a non-finite loss that
  stopped the run, or a non-finite final loss), runs whose final training loss ended above its
  first logged loss ("blew up"), mean final exact match and the time-averaged fraction of the
  controlled parameters in probation (HACBO) or frozen (BLAC).
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hacbo_jax.experiments import report as report_lib
from hacbo_jax.experiments.compare.run import UTC_TIME_FORMAT
from hacbo_jax.experiments.compare.report import BASE_EVAL_FILE
from hacbo_jax.experiments.compare.stats import block_parameter_counts, controlled_fraction
from hacbo_jax.experiments.methods import load_lrs, lr_for
from hacbo_jax.experiments.stats import (
    adjust_p_values,
    mean_ci,
    paired_effect_size,
    paired_ttest,
    seeds_for_power,
)

__all__ = ["build_summary", "evidence_span", "write_evidence_report"]

SUMMARY_FILE = "summary.json"
ALPHA = 0.05
# The clock of the equal-time comparison: the process's CPU seconds spent training (all
# threads; evaluation and checkpoints excluded). Other jobs on a shared machine stretch the
# wall clock of whichever run they overlap but barely move its CPU time; the wall clock
# (train_time_s) is reported beside it.
EQUAL_CLOCK = "train_cpu_s"


def _finished_runs(root: Path) -> list[report_lib.Run]:
    """Every run directory under ``root`` that has a summary.json."""
    if not root.is_dir():
        return []
    return [report_lib.load_run(p.parent) for p in sorted(root.rglob("summary.json"))]


def _nan_to_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _ci(values: Sequence[float]) -> dict[str, Any]:
    ci = mean_ci(values)
    return {"mean": ci.mean, "ci95": [_nan_to_none(ci.low), _nan_to_none(ci.high)]}


def _time_at(
    run: report_lib.Run, budget_s: float, base: float | None, clock: str = "train_time_s"
) -> float | None:
    """Exact match (%) of the run's last evaluation whose training clock is <= budget_s; the
    base model's (%) when none is (a run that has not trained yet is the base model)."""
    rows = [e for e in run.evals if e.get(clock) is not None]
    before = [e for e in rows if e[clock] <= budget_s]
    return 100 * before[-1]["exact_match"] if before else base


def _fraction(run: report_lib.Run, weights: np.ndarray | None) -> float | None:
    found = controlled_fraction(run, weights)
    return None if found is None or not found[1].size else float(found[1].mean())


def _blew_up(run: report_lib.Run) -> bool:
    _, losses = run.series("loss")
    finite = losses[np.isfinite(losses)]
    if run.diverged or not finite.size or not np.isfinite(losses[-1]):
        return True
    return bool(losses[-1] > finite[0])


REGIME_DIRS = {"clean": "", "conflict": "conflict"}  # regime -> its runs' folder under OUT
# The parts whose runs are compared with each other in a regime: the budget part and the LoRA
# rows (each method at its tuned rate, the same seeds and budget).
COMPARED_PARTS = ("budget", "lora")


def _runs_by_method(
    roots: Sequence[Path], runs: Sequence[report_lib.Run] | None = None
) -> dict[str, dict[int, report_lib.Run]]:
    """method -> seed -> run of the finished runs under ``roots``: picked from ``runs`` when
    given (already loaded), else read from disk."""
    by_method: dict[str, dict[int, report_lib.Run]] = {}
    for root in roots:
        found = (
            _finished_runs(root)
            if runs is None
            else [r for r in runs if r.path.is_relative_to(root)]
        )
        for run in found:
            by_method.setdefault(run.method, {})[run.seed] = run
    return by_method


def _seed_scores(runs: dict[int, report_lib.Run]) -> dict[str, Any]:
    """``seeds``, ``final_exact_match`` (%) per seed, their ``mean`` and ``ci95``."""
    seeds = sorted(runs)
    ems = [100 * runs[s].final_exact_match for s in seeds]
    return {"seeds": seeds, "final_exact_match": ems, **_ci(ems)}


def _model_weights(runs: Sequence[report_lib.Run]) -> np.ndarray | None:
    """Parameters per block of the runs' model (None when no run names a model on disk)."""
    model_path = next((r.config["model"]["path"] for r in runs if r.config), None)
    if model_path and Path(model_path).exists():
        return block_parameter_counts(model_path)
    return None


def _regime_summary(
    regime_dir: Path,
    base_em: float | None,
    lrs: dict[str, float],
    weights: np.ndarray | None,
    runs_loaded: Sequence[report_lib.Run],
) -> dict[str, Any]:
    """``methods``, ``comparisons``, ``gains`` and ``equal_time`` of one regime's budget and
    LoRA runs (those of ``runs_loaded`` under ``regime_dir``), each method with its
    time-averaged ``controlled_fraction`` (mean over seeds; None without a controller)."""
    by_method = _runs_by_method([regime_dir / part for part in COMPARED_PARTS], runs_loaded)
    methods = {}
    for name, runs in by_method.items():
        seeds = sorted(runs)
        fractions = [f for f in (_fraction(runs[s], weights) for s in seeds) if f is not None]
        methods[name] = {
            **_seed_scores(runs),
            "tuned_lr": lr_for(name, lrs),
            "diverged": sum(runs[s].diverged for s in seeds),
            # training clocks of the whole run, mean and 95% CI over seeds (wall and CPU)
            **{
                clock: _ci([runs[s].summary[clock] for s in seeds])
                if all((runs[s].summary or {}).get(clock) for s in seeds)
                else None
                for clock in ("train_time_s", "train_cpu_s")
            },
            "controlled_fraction": float(np.mean(fractions)) if fractions else None,
        }
    comparisons = []
    for a, b in itertools.combinations(sorted(methods), 2):
        common = sorted(set(by_method[a]) & set(by_method[b]))
        if len(common) < 2:
            continue
        xa = [100 * by_method[a][s].final_exact_match for s in common]
        xb = [100 * by_method[b][s].final_exact_match for s in common]
        test = paired_ttest(xa, xb, ALPHA)
        effect = paired_effect_size(xa, xb)
        comparisons.append(
            {
                "a": a,
                "b": b,
                "n": len(common),
                "diff": test.mean_diff,
                "ci95": [_nan_to_none(test.ci_low), _nan_to_none(test.ci_high)],
                "p": _nan_to_none(test.p),
                "effect_size_dz": _nan_to_none(effect.d),
                "effect_size_ci95": [_nan_to_none(effect.low), _nan_to_none(effect.high)],
                "seeds_for_80pct_power": seeds_for_power(effect.d, ALPHA, 0.8),
                "note": test.note,
            }
        )
    adjusted = adjust_p_values([c["p"] if c["p"] is not None else math.nan for c in comparisons])
    for c, q in zip(comparisons, adjusted):
        c["p_adjusted"] = _nan_to_none(q)

    gains = {}
    if base_em is not None:
        for name, m in methods.items():
            ems = m["final_exact_match"]
            test = paired_ttest(ems, [base_em] * len(ems), ALPHA) if len(ems) >= 2 else None
            gains[name] = {
                "diff": float(np.mean(ems)) - base_em,
                "ci95": [_nan_to_none(test.ci_low), _nan_to_none(test.ci_high)] if test else None,
                "p": _nan_to_none(test.p) if test else None,
            }

    equal_time = None
    adamw_runs = by_method.get("adamw", {})
    adamw_times = [(r.summary or {}).get(EQUAL_CLOCK) for r in adamw_runs.values()]
    if adamw_times and all(adamw_times):
        budget_s = float(np.max(adamw_times))  # every AdamW run is read at its end
        equal_time = {"clock": EQUAL_CLOCK, "budget_s": budget_s, "methods": {}}
        for name, runs in by_method.items():
            at = [_time_at(runs[s], budget_s, base_em, EQUAL_CLOCK) for s in sorted(runs)]
            values = [v for v in at if v is not None]
            equal_time["methods"][name] = {
                "exact_match": at,
                **(_ci(values) if len(values) >= 2 else {"mean": None, "ci95": None}),
            }

    return {
        "methods": methods,
        "comparisons": comparisons,
        "gains": gains,
        "equal_time": equal_time,
    }


def _ablation_summary(
    regime_dir: Path, runs_loaded: Sequence[report_lib.Run]
) -> dict[str, dict[str, Any]]:
    """Per method of the regime's ablations part (those of ``runs_loaded``): exact match per
    seed, mean and 95% CI, and how often the micro-dev buffer was refreshed and how many
    examples it swapped (mean per run)."""
    out = {}
    for name, runs in sorted(_runs_by_method([regime_dir / "ablations"], runs_loaded).items()):
        summaries = [runs[s].summary or {} for s in sorted(runs)]
        out[name] = {
            **_seed_scores(runs),
            "microdev_refreshes": float(
                np.mean([x.get("microdev_refreshes", 0) for x in summaries])
            ),
            "microdev_replaced": float(np.mean([x.get("microdev_replaced", 0) for x in summaries])),
        }
    return out


def gaussian_sign_cosine(true_cosine: np.ndarray | float) -> np.ndarray | float:
    """The sign-cosine expected for jointly Gaussian coordinates of correlation ``true_cosine``:
    (2/pi) arcsin(r) (Sheppard's formula); theta_neg's true-cosine counterpart under it is
    sin(pi/2 * theta_neg)."""
    return 2.0 / math.pi * np.arcsin(true_cosine)


def sign_cosine_pairs(runs: Sequence[report_lib.Run]) -> list[list[float]]:
    """[true cosine, sign-cosine] of every block at every measurement of the HACBO runs that
    recorded both (``controller.hacbo.record_true_cosine``): the first logged row at each
    controller count that is a multiple of the interval (the measurement's own step), so each
    measurement counts once."""
    pairs = []
    for run in runs:
        if run.controller_kind != "hacbo" or not run.config:
            continue
        interval = run.config["controller"]["hacbo"]["interval"]
        seen = set()
        for row in run.metrics:
            stats = row.get("controller") or {}
            count = stats.get("count")
            if stats.get("true_cosine") is None or not count or count % interval or count in seen:
                continue
            seen.add(count)
            pairs += [[float(t), float(c)] for t, c in zip(stats["true_cosine"], stats["cosine"])]
    return pairs


def sign_cosine_summary(pairs: list[list[float]], theta_neg: float) -> dict[str, Any] | None:
    """The pairs; a least-squares line sign = intercept + slope * true with its r; the Gaussian
    relation's scale k (sign = k * (2/pi) arcsin(true), k by least squares); and
    ``theta_neg_true``, the true cosine at which the line reaches theta_neg (beside
    ``theta_neg_true_gaussian``, sin(pi/2 * theta_neg)). None for fewer than 3 pairs."""
    if len(pairs) < 3:
        return None
    from scipy import stats as sps

    true, sign = np.asarray(pairs, dtype=np.float64).T
    line = sps.linregress(true, sign)
    g = gaussian_sign_cosine(np.clip(true, -1.0, 1.0))
    return {
        "pairs": pairs,
        "n": len(pairs),
        "linear_fit": {
            "intercept": float(line.intercept),
            "slope": float(line.slope),
            "r": float(line.rvalue),
        },
        "gaussian_fit_k": float(np.dot(g, sign) / np.dot(g, g)) if np.dot(g, g) > 0 else None,
        "theta_neg": theta_neg,
        "theta_neg_true": (
            float((theta_neg - line.intercept) / line.slope) if line.slope > 0 else None
        ),
        "theta_neg_true_gaussian": float(math.sin(math.pi / 2 * theta_neg)),
    }


def build_summary(out_dir: str | Path) -> dict[str, Any]:
    """The evidence as one JSON-able dict (see the module docstring)."""
    out_dir = Path(out_dir)
    stability_root = out_dir / "stability"
    # the base model on the evaluation problems, which every regime shares (a regime changes
    # the training data only): the clean regime's budget part writes it, else another's
    base_paths = [out_dir / folder / "budget" / BASE_EVAL_FILE for folder in REGIME_DIRS.values()]
    base_path = next((p for p in base_paths if p.is_file()), None)
    base = json.loads(base_path.read_text()) if base_path else None
    base_em = 100 * base["exact_match"] if base else None

    all_runs = _finished_runs(out_dir)
    weights = _model_weights(all_runs)
    regimes: dict[str, Any] = {}
    ablations: dict[str, dict[str, Any]] = {}
    for regime, folder in REGIME_DIRS.items():
        regime_dir = out_dir / folder if folder else out_dir
        lrs_path = regime_dir / "lrs.yaml"
        if not lrs_path.is_file():
            lrs_path = out_dir / "lrs.yaml"  # a regime run at the clean regime's rates
        lrs = load_lrs(lrs_path) if lrs_path.is_file() else {}
        found = _regime_summary(regime_dir, base_em, lrs, weights, all_runs)
        if found["methods"]:
            regimes[regime] = found
        for name, row in _ablation_summary(regime_dir, all_runs).items():
            ablations.setdefault(name, {})[regime] = row
    clean = regimes.get("clean") or _regime_summary(out_dir, base_em, {}, weights, [])
    theta = next((r.config["controller"]["hacbo"]["theta_neg"] for r in all_runs if r.config), 0.04)
    cells: dict[tuple[str, float, str], list[report_lib.Run]] = {}
    for run in (r for r in all_runs if r.path.is_relative_to(stability_root)):
        budget = run.path.parent.parent.name.removeprefix("budget_")
        lr = float(run.config["optim"]["lr"])
        cells.setdefault((run.method, lr, budget), []).append(run)
    stability = []
    for (name, lr, budget), runs in sorted(cells.items()):
        fractions = [f for f in (_fraction(r, weights) for r in runs) if f is not None]
        ems = [100 * r.final_exact_match for r in runs]
        stability.append(
            {
                "method": name,
                "lr": lr,
                "budget": {"on": 1.0, "off": None, "none": None}[budget],
                "budget_label": budget,
                "seeds": len(runs),
                "diverged": sum(bool(r.diverged) or not _finite_final(r) for r in runs),
                "blew_up": sum(_blew_up(r) for r in runs),
                "mean_exact_match": float(np.mean(ems)),
                "exact_match": ems,
                "controlled_fraction": float(np.mean(fractions)) if fractions else None,
            }
        )
    return {
        "base_exact_match": base_em,
        "eval_examples": base["n"] if base else None,
        # the clean regime's, at the top level as before regimes existed
        "methods": clean["methods"],
        "comparisons": clean["comparisons"],
        "correction": "Benjamini-Hochberg over all pairs (scipy.stats.false_discovery_control)",
        "gains": clean["gains"],
        "equal_time": clean["equal_time"],
        "stability": stability,
        "regimes": regimes,
        "ablations": ablations,
        "sign_cosine": sign_cosine_summary(sign_cosine_pairs(all_runs), float(theta)),
    }


def _finite_final(run: report_lib.Run) -> bool:
    loss = run.final_loss
    return loss is not None and math.isfinite(loss)


# ---------------------------------------------------------------------------------------------
# Figures (all drawn from the summary and the run logs).
# ---------------------------------------------------------------------------------------------

COLORS = {
    "adamw": "tab:blue",
    "blac": "tab:orange",
    "hacbo": "tab:green",
    "hacbo_gamma0": "tab:red",
    "hacbo_share_uniform": "tab:purple",
    "adagradselect": "tab:brown",
}


def _color(name: str) -> str:
    return COLORS.get(name, "tab:gray")


def plot_final(summary: dict[str, Any], path: Path) -> Path:
    """Final exact match per method: seeds as dots, mean and 95% CI, the base model line; the
    axis spans the data (not 0-100), so the differences are visible."""
    import matplotlib.pyplot as plt

    methods = summary["methods"]
    names = sorted(methods, key=lambda m: methods[m]["mean"])
    fig, ax = plt.subplots(figsize=(7, 0.55 * len(names) + 1.6))
    for i, name in enumerate(names):
        m = methods[name]
        ax.scatter(
            m["final_exact_match"],
            [i] * len(m["final_exact_match"]),
            s=14,
            color=_color(name),
            alpha=0.6,
            zorder=3,
        )
        lo, hi = m["ci95"]
        if lo is not None:
            ax.plot([lo, hi], [i, i], color=_color(name), lw=3, alpha=0.5)
        ax.plot(m["mean"], i, "k|", ms=14, mew=2)
    if summary["base_exact_match"] is not None:
        ax.axvline(summary["base_exact_match"], color="grey", ls="--", lw=1)
        ax.annotate(
            "base model",
            (summary["base_exact_match"], len(names) - 0.5),
            fontsize=8,
            color="grey",
            ha="right",
            rotation=90,
            va="top",
        )
    ax.set_yticks(
        range(len(names)),
        [f"{n} (lr {methods[n]['tuned_lr']:.1e})" if methods[n]["tuned_lr"] else n for n in names],
    )
    ax.set_xlabel("final exact match (%): seeds (dots), mean (|), 95% CI (bar)")
    ax.set_ylim(-0.6, len(names) - 0.4)
    return report_lib.save_figure(fig, path, fit_outside_legend=True)


def _curves(
    runs: dict[int, report_lib.Run], key: str, base: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """x (mean over seeds) and exact match (%) [seeds, points] of the evaluations all seeds
    share, starting from the base model at 0 when known."""
    rows = [r.evals for r in runs.values()]
    n = min(len(r) for r in rows)
    xs = np.array([[row[i].get(key, math.nan) for i in range(n)] for row in rows], dtype=float)
    ys = np.array([[100 * row[i]["exact_match"] for i in range(n)] for row in rows], dtype=float)
    if base is not None:
        xs = np.concatenate([np.zeros((len(rows), 1)), xs], axis=1)
        ys = np.concatenate([np.full((len(rows), 1), base), ys], axis=1)
    return xs.mean(axis=0), ys


def plot_over_budget(out_dir: Path, summary: dict[str, Any], path: Path) -> Path:
    """Exact match against optimiser steps and against the training clock, mean over seeds
    with a 95% t band, one line per method; the legend sits outside the axes."""
    import matplotlib.pyplot as plt
    from scipy import stats as sps

    by_method = _runs_by_method([out_dir / part for part in COMPARED_PARTS])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for name in sorted(by_method):
        runs = by_method[name]
        for ax, key in zip(axes, ("step", EQUAL_CLOCK)):
            x, ys = _curves(runs, key, summary["base_exact_match"])
            mean = ys.mean(axis=0)
            ax.plot(x, mean, marker="o", ms=3, color=_color(name), label=name)
            if ys.shape[0] >= 2:
                half = (
                    sps.t.ppf(0.975, ys.shape[0] - 1)
                    * ys.std(axis=0, ddof=1)
                    / math.sqrt(ys.shape[0])
                )
                ax.fill_between(x, mean - half, mean + half, color=_color(name), alpha=0.15)
    if summary.get("equal_time"):
        axes[1].axvline(summary["equal_time"]["budget_s"], color="k", ls=":", lw=1)
    axes[0].set_xlabel("optimiser steps")
    axes[1].set_xlabel("training CPU seconds (dev passes and refreshes counted, evaluation not)")
    axes[0].set_ylabel("exact match (%), mean and 95% CI over seeds")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.legend(
        *axes[0].get_legend_handles_labels(),
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=8,
    )
    return report_lib.save_figure(fig, path, fit_outside_legend=True)


def plot_controlled_fraction(regime_dir: Path, path: Path) -> Path | None:
    """The share of the controlled parameters in probation (HACBO and its variants) or frozen
    (BLAC) over the steps, mean over seeds per method (blocks weighted by their parameters);
    None when no controlled run of the regime logged one."""
    import matplotlib.pyplot as plt

    weights = None
    curves = {}
    for name, runs in sorted(_runs_by_method([regime_dir / "budget"]).items()):
        weights = weights if weights is not None else _model_weights(list(runs.values()))
        found = [controlled_fraction(r, weights) for r in runs.values()]
        found = [f for f in found if f is not None and f[1].size]
        if not found:
            continue
        n = min(len(f[0]) for f in found)
        curves[name] = (found[0][0][:n], np.mean([f[1][:n] for f in found], axis=0))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, (steps, fraction) in curves.items():
        ax.plot(steps, fraction, color=_color(name), label=name, drawstyle="steps-post")
    ax.set_xlabel("optimiser steps")
    ax.set_ylabel("controlled parameters in probation / frozen\n(share of the logging window)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return report_lib.save_figure(fig, path, fit_outside_legend=True)


def plot_loss(out_dir: Path, path: Path) -> Path:
    """Training loss over steps, mean over seeds per method, legend outside the data."""
    import matplotlib.pyplot as plt

    by_method: dict[str, list[report_lib.Run]] = {}
    for run in _finished_runs(out_dir / "budget"):
        by_method.setdefault(run.method, []).append(run)
    fig, ax = plt.subplots(figsize=(8, 4))
    for name in sorted(by_method):
        series = [r.series("loss") for r in by_method[name]]
        n = min(len(s) for s, _ in series)
        ax.plot(
            series[0][0][:n],
            np.mean([v[:n] for _, v in series], axis=0),
            color=_color(name),
            label=name,
            lw=1.2,
        )
    ax.set_xlabel("optimiser steps")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    return report_lib.save_figure(fig, path, fit_outside_legend=True)


def plot_stability(summary: dict[str, Any], path: Path) -> Path:
    """Exact match (top) and divergence rate (bottom) against the base learning rate, one
    column per budget setting; AdamW (no budget) appears in both columns."""
    import matplotlib.pyplot as plt

    cells = summary["stability"]
    budgets = ("on", "off")
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True, sharey="row")
    for col, budget in enumerate(budgets):
        for name in sorted({c["method"] for c in cells}):
            rows = sorted(
                (c for c in cells if c["method"] == name and c["budget_label"] in (budget, "none")),
                key=lambda c: c["lr"],
            )
            if not rows:
                continue
            lrs = [c["lr"] for c in rows]
            style = dict(
                color=_color(name),
                marker="o",
                ms=4,
                label=name,
                ls="--" if name == "adamw" else "-",
            )
            axes[0, col].plot(lrs, [c["mean_exact_match"] for c in rows], **style)
            axes[1, col].plot(lrs, [c["diverged"] / c["seeds"] for c in rows], **style)
        axes[0, col].set_title(
            f"update-norm budget {'lambda = 1' if budget == 'on' else 'off'}"
            " (AdamW dashed: no controller, no budget)",
            fontsize=9,
        )
        axes[1, col].set_xlabel("base learning rate")
        for ax in axes[:, col]:
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
    if summary["base_exact_match"] is not None:
        for ax in axes[0]:
            ax.axhline(summary["base_exact_match"], color="grey", ls="--", lw=1)
    axes[0, 0].set_ylabel("final exact match (%), mean over seeds")
    axes[1, 0].set_ylabel("fraction of seeds diverged")
    fig.legend(
        *axes[0, 0].get_legend_handles_labels(),
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=8,
    )
    return report_lib.save_figure(fig, path, fit_outside_legend=True)


# ---------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------


def _fmt(x: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def _fmt_ci(ci: Sequence[float | None] | None, fmt: str = "{:.1f}") -> str:
    if not ci or ci[0] is None:
        return "n/a"
    return f"[{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def evidence_span(timing: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The whole evidence's wall time from ``timing.yaml``: first start to last finish (each
    invocation started at ``finished_utc - elapsed_s``), and each part's own span (shards run
    side by side, so a part takes as long as its slowest shard). ``None`` with no entries.
    Gaps between invocations count, so this is an upper bound on the evidence's cost."""
    if not timing:
        return None
    intervals = []
    for t in timing:
        end = datetime.datetime.strptime(t["finished_utc"], UTC_TIME_FORMAT)
        intervals.append((t["part"], end - datetime.timedelta(seconds=t["elapsed_s"]), end))
    parts: dict[str, float] = {}
    for part in dict.fromkeys(p for p, _, _ in intervals):
        mine = [(a, b) for p, a, b in intervals if p == part]
        parts[part] = (max(b for _, b in mine) - min(a for a, _ in mine)).total_seconds()
    start, end = min(a for _, a, _ in intervals), max(b for _, _, b in intervals)
    return {
        "start_utc": start.strftime(UTC_TIME_FORMAT),
        "end_utc": end.strftime(UTC_TIME_FORMAT),
        "elapsed_s": (end - start).total_seconds(),
        "parts": parts,
    }


def _comparison_rows(comparisons: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| a - b | n | diff (points) | 95% CI | p | p adjusted | d_z [95% CI] | n80 |",
        "| --- | ---: | ---: | --- | ---: | ---: | --- | ---: |",
    ]
    for c in comparisons:
        lines.append(
            f"| {c['a']} - {c['b']} | {c['n']} | {_fmt(c['diff'], '{:+.1f}')} | "
            f"{_fmt_ci(c['ci95'], '{:+.1f}')} | {_fmt(c['p'], '{:.3f}')} | "
            f"{_fmt(c['p_adjusted'], '{:.3f}')} | {_fmt(c['effect_size_dz'], '{:+.2f}')} "
            f"{_fmt_ci(c['effect_size_ci95'], '{:+.2f}')} | "
            f"{c['seeds_for_80pct_power'] if c['seeds_for_80pct_power'] else 'n/a (no effect)'} |"
        )
    return lines


def _mechanism_sections(summary: dict[str, Any], figures: dict[str, str]) -> list[str]:
    """The regimes (methods with their controlled fraction, the significant pairs), the
    ablations per regime and the sign-cosine relation."""
    lines: list[str] = []
    for regime, found in summary.get("regimes", {}).items():
        lines += [
            f"## Regime `{regime}`",
            "",
            "| method | lr | seeds | mean (%) | 95% CI | gain over base | equal CPU time (%) "
            "| controlled fraction |",
            "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
        ]
        equal = (found.get("equal_time") or {}).get("methods", {})
        for name, m in sorted(found["methods"].items(), key=lambda kv: -kv[1]["mean"]):
            gain = found["gains"].get(name, {})
            lines.append(
                f"| {name} | {_fmt(m['tuned_lr'], '{:.1e}')} | {len(m['seeds'])} | "
                f"{_fmt(m['mean'])} | {_fmt_ci(m['ci95'])} | {_fmt(gain.get('diff'), '{:+.1f}')} | "
                f"{_fmt(equal.get(name, {}).get('mean'))} | "
                f"{_fmt(m['controlled_fraction'], '{:.3f}')} |"
            )
        if regime != "clean":
            lines += ["", *_comparison_rows(found["comparisons"])]
        significant = [
            c
            for c in found["comparisons"]
            if c["p_adjusted"] is not None and c["p_adjusted"] < ALPHA
        ]
        lines += [
            "",
            f"Pairs that differ after correction ({len(found['comparisons'])} pairs, "
            "Benjamini-Hochberg): "
            + (
                ", ".join(f"{c['a']} - {c['b']} = {c['diff']:+.1f}" for c in significant)
                if significant
                else "none"
            )
            + ".",
            "",
        ]
        for key in (f"budget_{regime}", f"fraction_{regime}"):
            if key in figures:
                lines += [f"![{key}]({figures[key]})", ""]
    if summary.get("ablations"):
        lines += [
            "## Ablations (HACBO's rate, one mechanism off)",
            "",
            "| ablation | regime | seeds | mean (%) | 95% CI | refreshes | examples swapped |",
            "| --- | --- | ---: | ---: | --- | ---: | ---: |",
        ]
        for name, per_regime in sorted(summary["ablations"].items()):
            for regime, a in per_regime.items():
                lines.append(
                    f"| {name} | {regime} | {len(a['seeds'])} | {_fmt(a['mean'])} | "
                    f"{_fmt_ci(a['ci95'])} | {a['microdev_refreshes']:.1f} | "
                    f"{a['microdev_replaced']:.1f} |"
                )
        lines.append("")
    sign = summary.get("sign_cosine")
    if sign:
        fit = sign["linear_fit"]
        lines += [
            "## Sign-cosine against the true cosine",
            "",
            f"{sign['n']} (block, measurement) pairs: sign = {fit['intercept']:.4f} + "
            f"{fit['slope']:.3f} x true (r = {fit['r']:.3f}); the Gaussian relation "
            f"(2/pi) arcsin fits with scale k = {_fmt(sign['gaussian_fit_k'], '{:.3f}')}. "
            f"theta_neg = {sign['theta_neg']} on the sign-cosine is a true cosine of "
            f"{_fmt(sign['theta_neg_true'], '{:.3f}')} by the fitted line "
            f"({sign['theta_neg_true_gaussian']:.3f} under the Gaussian relation).",
            "",
        ]
        if "sign_cosine" in figures:
            lines += [f"![sign-cosine]({figures['sign_cosine']})", ""]
    return lines


def plot_sign_cosine(summary: dict[str, Any], path: Path) -> Path:
    """Scatter of (true cosine, sign-cosine), the fitted line and (2/pi) arcsin."""
    import matplotlib.pyplot as plt

    sign = summary["sign_cosine"]
    true, sc = np.asarray(sign["pairs"], dtype=np.float64).T
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(true, sc, s=6, alpha=0.4, color="tab:green", label="block x measurement")
    x = np.linspace(min(-0.2, true.min()), max(0.6, true.max()), 200)
    fit = sign["linear_fit"]
    ax.plot(x, fit["intercept"] + fit["slope"] * x, color="k", label="least squares")
    ax.plot(x, gaussian_sign_cosine(np.clip(x, -1, 1)), color="tab:red", ls="--",
            label="(2/pi) arcsin(true)")  # fmt: skip
    ax.axhline(sign["theta_neg"], color="grey", ls=":", lw=1, label="theta_neg")
    ax.set_xlabel("true cosine of the block's train and dev gradients")
    ax.set_ylabel("sign-cosine")
    ax.legend(fontsize=8, loc="upper left")
    return report_lib.save_figure(fig, path)


def _clean_sections(summary: dict[str, Any], figures: dict[str, str]) -> list[str]:
    """The clean regime's tables at the top level: final exact match, paired comparisons,
    equal training time and its figures."""
    lines: list[str] = []
    lines += [
        "## Final exact match at each method's tuned rate",
        "",
        "| method | tuned lr | seeds | mean (%) | 95% CI | gain over base | gain 95% CI | diverged |",
        "| --- | ---: | ---: | ---: | --- | ---: | --- | ---: |",
    ]
    for name, m in sorted(summary["methods"].items(), key=lambda kv: -kv[1]["mean"]):
        gain = summary["gains"].get(name, {})
        lines.append(
            f"| {name} | {_fmt(m['tuned_lr'], '{:.2e}')} | {len(m['seeds'])} | {_fmt(m['mean'])} | "
            f"{_fmt_ci(m['ci95'])} | {_fmt(gain.get('diff'), '{:+.1f}')} | "
            f"{_fmt_ci(gain.get('ci95'), '{:+.1f}')} | {m['diverged']} |"
        )
    lines += ["", f"![final exact match]({figures['final']})", ""]
    lines += [
        "## Paired comparisons",
        "",
        f"Paired t-tests over seeds; p adjusted by {summary['correction']}. d_z: mean paired "
        "difference / its SD, with its exact 95% interval; n80: seeds needed to detect the "
        "observed d_z with 80% power at alpha 0.05.",
        "",
    ]
    lines += _comparison_rows(summary["comparisons"])
    eq = summary.get("equal_time")
    if eq:
        lines += [
            "",
            "## Equal training time",
            "",
            f"Exact match of each method at {eq['budget_s']:.1f} training CPU seconds (the "
            "longest AdamW run; the controllers' dev passes and micro-dev "
            "refreshes count, evaluation does not), from each run's last evaluation at or "
            "before that time (the base model's score if none):",
            "",
            "| method | mean (%) | 95% CI | per seed |",
            "| --- | ---: | --- | --- |",
        ]
        for name, m in sorted(eq["methods"].items()):
            lines.append(
                f"| {name} | {_fmt(m['mean'])} | {_fmt_ci(m['ci95'])} | "
                + ", ".join(_fmt(v) for v in m["exact_match"])
                + " |"
            )
    lines += [
        "",
        f"![exact match over steps and time]({figures['budget']})",
        "",
        f"![training loss]({figures['loss']})",
        "",
    ]
    return lines


def _report_md(summary: dict[str, Any], figures: dict[str, str], command: str, timing) -> str:
    lines = ["# Evidence: can the methods be told apart?", ""]
    lines += [f"Regenerate this report from the runs: `{command}`", ""]
    base = summary["base_exact_match"]
    lines += [
        f"Base model (no fine-tuning): **{_fmt(base)}%** exact match on "
        f"{summary['eval_examples']} held-out problems.",
        "",
    ]
    if summary["methods"]:
        lines += _clean_sections(summary, figures)
    if summary["stability"]:
        lines += [
            "## Stability grid",
            "",
            "Diverged: the run stopped on consecutive non-finite losses, or ended with a "
            "non-finite loss. Blew up: its final training loss is above its first logged "
            "loss. Controlled fraction: time-averaged share of the controlled parameters "
            "in probation (HACBO) or frozen (BLAC).",
            "",
            "| method | budget | lr | seeds | diverged | blew up | mean EM (%) | controlled fraction |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for c in summary["stability"]:
            frac = c["controlled_fraction"]
            frac_text = "no controller" if c["method"] == "adamw" else _fmt(frac, "{:.3f}")
            lines.append(
                f"| {c['method']} | {c['budget_label']} | {c['lr']:.1e} | {c['seeds']} | "
                f"{c['diverged']} | {c['blew_up']} | {_fmt(c['mean_exact_match'])} | {frac_text} |"
            )
        lines += ["", f"![stability]({figures['stability']})", ""]
    lines += _mechanism_sections(summary, figures)
    if timing:
        lines += [
            "## Wall time of each part (this machine, 2 CPU cores)",
            "",
            "| part | command | elapsed s | runs executed / skipped / failed |",
            "| --- | --- | ---: | --- |",
        ]
        for t in timing:
            lines.append(
                f"| {t['part']} | `{t['command']}` | {t['elapsed_s']:.0f} | "
                f"{t['executed']} / {t['skipped']} / {t['failed']} |"
            )
        span = evidence_span(timing)
        per_part = ", ".join(f"{p} {secs / 60:.1f} min" for p, secs in span["parts"].items())
        lines += [
            "",
            (
                f"All parts: from {span['start_utc']} to {span['end_utc']} UTC, "
                f"**{span['elapsed_s'] / 60:.1f} min** ({per_part}; waits between invocations "
                "count, the report part itself is not in `timing.yaml`)."
            ),
        ]
    return "\n".join(lines) + "\n"


def write_evidence_report(
    out_dir: str | Path, report_dir: str | Path, *, command: str = ""
) -> Path:
    """Writes ``summary.json`` first, then the figures and ``report.md`` from it; returns the
    report's path."""
    out_dir, report_dir = Path(out_dir), Path(report_dir)
    if not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r}: not a directory (the evidence runs' --out)")
    summary = build_summary(out_dir)
    if not summary["methods"] and not summary["stability"] and not summary["regimes"]:
        raise ValueError(
            f"--out {str(out_dir)!r}: no finished run of the budget or stability part to report "
            "on (run those parts with this --out first)"
        )
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    summary = json.loads((report_dir / SUMMARY_FILE).read_text())  # the report reads the file
    figures = {}
    if summary["methods"]:
        figures["final"] = plot_final(summary, report_dir / "final_exact_match.png").name
        figures["budget"] = plot_over_budget(
            out_dir, summary, report_dir / "exact_match_over_budget.png"
        ).name
        figures["loss"] = plot_loss(out_dir, report_dir / "training_loss.png").name
    if summary["stability"]:
        figures["stability"] = plot_stability(summary, report_dir / "stability.png").name
    if summary.get("sign_cosine"):
        figures["sign_cosine"] = plot_sign_cosine(summary, report_dir / "sign_cosine.png").name
    for regime, found in summary.get("regimes", {}).items():
        folder = REGIME_DIRS[regime]
        regime_dir = out_dir / folder if folder else out_dir
        if folder:  # the clean regime's is exact_match_over_budget.png
            figures[f"budget_{regime}"] = plot_over_budget(
                regime_dir,
                {**found, "base_exact_match": summary["base_exact_match"]},
                report_dir / f"exact_match_over_budget_{regime}.png",
            ).name
        drawn = plot_controlled_fraction(
            regime_dir, report_dir / f"controlled_fraction_{regime}.png"
        )
        if drawn is not None:
            figures[f"fraction_{regime}"] = drawn.name
    timing_path = out_dir / "timing.yaml"
    timing = yaml.safe_load(timing_path.read_text()) if timing_path.is_file() else []
    path = report_dir / "report.md"
    path.write_text(_report_md(summary, figures, command, timing))
    return path
