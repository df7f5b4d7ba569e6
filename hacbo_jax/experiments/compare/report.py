"""The comparison's report: figures and ``report.md`` from the finished runs of the grid."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from hacbo_jax.experiments import report as report_lib
from hacbo_jax.experiments.compare.stats import (
    MethodSummary,
    block_parameter_counts,
    controlled_fraction,
    paired_against,
    summarize_method,
)
from hacbo_jax.experiments.methods import ALPHA, REFERENCE_METHOD
from hacbo_jax.experiments.stats import MeanCI

__all__ = ["BASE_EVAL_FILE", "load_comparison_runs", "write_comparison_report"]

# The base model's exact match, written once per comparison by compare.base_model_exact_match.
BASE_EVAL_FILE = "base_model_eval.json"

# ---------------------------------------------------------------------------------------------
# Figures and report.
# ---------------------------------------------------------------------------------------------


def format_number(x: float | None, fmt: str = "{:.2f}") -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return fmt.format(x)


def format_ci(ci: MeanCI | None, fmt: str = "{:.2f}") -> str:
    if ci is None:
        return "n/a"
    if ci.n < 2:
        return f"{fmt.format(ci.mean)} (n=1, no CI)"
    return f"{fmt.format(ci.mean)} [{fmt.format(ci.low)}, {fmt.format(ci.high)}]"


def plot_exact_match_ci(
    summaries: Sequence[MethodSummary], path: Path, base: float | None = None
) -> Path:
    """Mean exact match per method with its 95% CI (bars) and each seed's value (dots);
    ``base``: the base model's exact match (%) before fine-tuning, as a dashed line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(summaries) + 2), 4))
    if base is not None:
        ax.axhline(
            base, color="grey", ls="--", lw=1, label=f"base model, no fine-tuning ({base:.1f}%)"
        )
        ax.legend(fontsize=8, loc="lower right")
    for i, s in enumerate(summaries):
        if s.exact_match is None:
            continue
        err = (
            None
            if s.exact_match.n < 2
            else [[s.exact_match.half_width], [s.exact_match.half_width]]
        )
        ax.bar(
            i,
            s.exact_match.mean,
            color="tab:blue" if s.method != REFERENCE_METHOD else "tab:orange",
            alpha=0.6,
            yerr=err,
            capsize=5,
        )
        values = [100 * r.final_exact_match for r in s.runs if r.final_exact_match is not None]
        diverged = [r.diverged for r in s.runs if r.final_exact_match is not None]
        jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [0.0]
        for dx, v, d in zip(jitter, values, diverged):
            ax.plot(i + dx, v, "x" if d else "o", color="tab:red" if d else "black", ms=4)
    ax.set_xticks(
        range(len(summaries)), [s.method for s in summaries], rotation=25, ha="right", fontsize=8
    )
    ax.set_ylabel("final exact match (%)")
    ax.set_title("mean over seeds with 95% t-interval; dots = seeds (red x = diverged)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return report_lib.save_figure(fig, path)


def plot_controlled_fraction(
    summaries: Sequence[MethodSummary], weights: np.ndarray | None, path: Path
) -> Path | None:
    """Fraction of controlled parameters in probation / frozen against step, mean over seeds."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for s in summaries:
        curves = [controlled_fraction(r, weights) for r in s.runs]
        curves = [c for c in curves if c is not None]
        if not curves:
            continue
        steps = curves[0][0]
        same = [c[1] for c in curves if np.array_equal(c[0], steps)]
        kind = "frozen" if s.runs[0].controller_kind == "blac" else "probation"
        ax.plot(steps, np.mean(same, axis=0), label=f"{s.method} ({kind})", lw=1.5)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of controlled parameters")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("in probation (HACBO) or frozen (BLAC), mean over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return report_lib.save_figure(fig, path)


FAILED_FILE = "failed.json"  # written by compare.run_comparison for a run that raised


def incomplete_runs(
    out_dir: Path, methods: Sequence[str], seeds: Sequence[int]
) -> list[tuple[str, int, str]]:
    """``(method, seed, why)`` of every grid run without a summary: failed (with the error) or
    missing (never run, or interrupted)."""
    rows = []
    for method in methods:
        for seed in seeds:
            run_dir = Path(out_dir) / "runs" / method / f"seed{seed}"
            if (run_dir / "summary.json").is_file():
                continue
            why = "missing (not run, or interrupted: run the grid again to continue it)"
            if (run_dir / FAILED_FILE).is_file():
                try:
                    why = "failed: " + json.loads((run_dir / FAILED_FILE).read_text())["error"]
                except (ValueError, KeyError, TypeError):
                    why = "failed (unreadable failed.json)"
            rows.append((method, seed, why))
    return rows


def _incomplete_run_lines(out_dir, methods, seeds, by_method) -> list[str]:
    rows = incomplete_runs(out_dir, methods, seeds)
    if not rows:
        return []
    lines = [
        "",
        f"## Missing and failed runs ({len(rows)} of {len(methods) * len(seeds)})",
        "",
        "The statistics above use only the finished runs: "
        + ", ".join(f"{m} {len(by_method[m])}/{len(seeds)} seeds" for m in methods)
        + ".",
        "",
        "| method | seed | status |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {m} | {s} | {why.replace('|', '/')} |" for m, s, why in rows]
    return lines + [""]


def load_comparison_runs(
    out_dir: Path, methods: Sequence[str], seeds: Sequence[int]
) -> dict[str, list[report_lib.Run]]:
    found: dict[str, list[report_lib.Run]] = {}
    for method in methods:
        runs = []
        for seed in seeds:
            run_dir = out_dir / "runs" / method / f"seed{seed}"
            if (run_dir / "summary.json").is_file():
                runs.append(report_lib.load_run(run_dir))
        found[method] = runs
    return found


def _header_lines(all_runs, seeds, model_path, base, command, command_label) -> list[str]:
    lines = ["# Multi-seed comparison", ""]
    if command:
        lines += [command_label, "", "```", command, "```", ""]
    first = all_runs[0].config or {}
    lines += [
        f"Seeds: {', '.join(map(str, seeds))}. Base model `{Path(str(model_path)).name}`, task "
        f"`{first.get('data', {}).get('task')}`"
        + (
            f" (`{first['data']['synthetic']['preset']}`)"
            if first.get("data", {}).get("task") == "synthetic"
            else ""
        )
        + f", {all_runs[0].steps} steps per run, exact match on "
        f"{(all_runs[0].summary or {}).get('eval_examples', 'n/a')} held-out problems.",
        "",
    ]
    if base:
        lines += [
            f"Base model before fine-tuning: {100 * base['exact_match']:.2f}% exact match on the "
            f"same {base['n']} problems (greedy decoding as in the runs); model.safetensors "
            f"sha256 `{base.get('model_sha256')}`.",
            "",
        ]
    return lines


def _method_table_lines(summaries: Sequence[MethodSummary]) -> list[str]:
    lines = [
        "## Per method (mean over seeds, 95% t confidence interval in brackets)",
        "",
        "| method | runs | lr | exact match (%) | final train loss | diverged | wall time / run (s) "
        "| energy / run (kWh) | controlled params in probation / frozen: time mean, at end |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | --- | --- |",
    ]
    for s in summaries:
        lr = ((s.runs[0].config or {}).get("optim") or {}).get("lr")
        loss = format_ci(s.loss, "{:.4f}")
        if s.finite_losses < len(s.runs):
            loss += f" ({s.finite_losses} of {len(s.runs)} finite)"
        energy = (
            format_ci(s.energy_kwh, "{:.3g}") + f" ({s.energy_source})"
            if s.energy_kwh
            else f"n/a ({s.energy_source})"
        )
        fraction = (
            "n/a (no controller)"
            if s.fraction_mean is None
            else f"{100 * s.fraction_mean:.1f}%, {100 * s.fraction_final:.1f}%"
        )
        cells = [
            f"| {s.method}",
            str(len(s.runs)),
            format_number(lr, "{:.3g}"),
            format_ci(s.exact_match),
            loss,
            f"{s.diverged}/{len(s.runs)}",
            format_number(s.wall_time.mean if s.wall_time else None, "{:.0f}"),
            energy,
            fraction,
        ]
        lines.append(" | ".join(cells) + " |")
    lines.append("")
    return lines


def _paired_test_lines(by_method, methods: Sequence[str]) -> list[str]:
    reference = by_method.get(REFERENCE_METHOD) or []
    others = [m for m in methods if m != REFERENCE_METHOD and by_method[m]]
    if not (reference and others):
        return []
    lines = [
        f"## Paired t-tests: {REFERENCE_METHOD} minus each method, exact match (percentage points)",
        "",
        f"Same seeds paired (`scipy.stats.ttest_rel`, two-sided, alpha = {ALPHA}); the interval "
        f"is the {100 * (1 - ALPHA):.0f}% t-interval of the mean paired difference.",
        "",
        "| vs | pairs | mean difference | 95% CI | t | p | significant |",
        "| --- | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for method in others:
        test = paired_against(reference, by_method[method])
        if test is None:
            lines.append(f"| {method} | 0 | n/a | n/a | n/a | n/a | no common seed |")
            continue
        ci = (
            "n/a"
            if not math.isfinite(test.ci_low)
            else f"[{test.ci_low:+.2f}, {test.ci_high:+.2f}]"
        )
        verdict = test.note or ("yes" if test.significant else "no")
        lines.append(
            f"| {method} | {test.n} | {test.mean_diff:+.2f} | {ci} | {format_number(test.t)} | "
            f"{format_number(test.p, '{:.3g}')} | {verdict} |"
        )
    lines.append("")
    return lines


def _figures(summaries, weights, base, report_dir: Path) -> list[Path | None]:
    """Ours (CI, controlled fraction) and the training report's, on one run per method."""
    figures = [
        plot_exact_match_ci(
            summaries,
            report_dir / "exact_match_ci.png",
            base=None if base is None else 100 * base["exact_match"],
        ),
        plot_controlled_fraction(summaries, weights, report_dir / "controlled_fraction.png"),
    ]
    shown = [s.runs[0] for s in summaries]
    labels = [r.label for r in shown]
    for r in shown:
        r.label = f"{r.method} (seed {r.seed})"
    figures.append(report_lib.plot_loss(shown, report_dir / "loss.png"))
    for r in shown:
        slug = report_lib.slug(r.method)
        figures.append(report_lib.plot_multipliers(r, report_dir / f"multipliers_{slug}.png"))
        figures.append(report_lib.plot_status(r, report_dir / f"status_{slug}.png"))
    for r, label in zip(shown, labels):
        r.label = label
    return figures


def write_comparison_report(
    out_dir: str | Path,
    methods: Sequence[str],
    seeds: Sequence[int],
    report_dir: str | Path | None = None,
    *,
    command: str | None = None,
    timing: Mapping[str, Any] | None = None,
    command_label: str = "Regenerate with:",
) -> Path:
    """Statistics and figures of the finished runs under ``out_dir/runs``; returns report.md."""
    out_dir = Path(out_dir)
    report_dir = Path(report_dir) if report_dir is not None else out_dir
    report_dir.mkdir(parents=True, exist_ok=True)
    by_method = load_comparison_runs(out_dir, methods, seeds)
    all_runs = [r for m in methods for r in by_method[m]]
    if not all_runs:
        raise report_lib.RunDirError(
            f"{out_dir / 'runs'}: no finished run of {list(methods)} for seeds {list(seeds)}"
        )
    model_path = (all_runs[0].config or {}).get("model", {}).get("path")
    weights = block_parameter_counts(model_path) if model_path else None
    summaries = [summarize_method(m, by_method[m], weights) for m in methods if by_method[m]]
    base_path = out_dir / BASE_EVAL_FILE
    base = json.loads(base_path.read_text()) if base_path.is_file() else None

    lines = _header_lines(all_runs, seeds, model_path, base, command, command_label)
    lines += _method_table_lines(summaries)
    lines += _paired_test_lines(by_method, methods)
    figures = _figures(summaries, weights, base, report_dir)
    lines += [
        "## Figures",
        "",
        "Exact match per method (mean, 95% CI, seeds as dots); fraction of controlled "
        "parameters in probation / frozen over training (mean over seeds); training loss, "
        "per-block multipliers and probation / frozen blocks of each method's first seed.",
        "",
    ]
    lines += [f"![{p.stem}]({p.name})" for p in figures if p is not None]
    lines += ["", "## Every run", "", report_lib.summary_table(all_runs)]
    lines += _incomplete_run_lines(out_dir, methods, seeds, by_method)
    if timing:
        lines += ["## Wall time", ""]
        lines += [f"- {key}: {value}" for key, value in timing.items()]
        lines.append("")
    path = report_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
