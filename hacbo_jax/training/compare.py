"""Multi-seed comparison of fine-tuning methods, resumable, with a statistical report.

    python -m train.compare --config configs/compare_cpu.yaml --seeds 5 \\
        --methods adamw,blac,hacbo,hacbo_gamma0 [--lrs configs/lrs/compare_cpu.yaml] \\
        [--out runs/compare] [--report-dir DIR] [key=value ...]

Runs every (method, seed) of the grid one after another in this process (``train.finetune.run``;
on a small CPU parallel processes would only contend), each in ``OUT/runs/<method>/seed<k>/``,
then writes ``report.md`` and its figures into ``--report-dir`` (default ``OUT``).

Resumable: a run whose ``summary.json`` exists and whose resolved ``config.yaml`` equals the
config it would get now is not run again; an interrupted run (checkpoint, no summary) continues
with ``run(cfg, resume=True)``; a run directory whose config differs (base config, overrides or
learning rate changed) is deleted and run afresh. JAX's persistent compilation cache
(``--jax-cache``, default ``OUT/jax_cache``) lets later seeds of a method skip XLA compilation.

Methods (:data:`METHODS`, each a list of config overrides): the four compared methods ``adamw``
(no controller), ``blac``, ``hacbo``, ``hacbo_gamma0`` (probation blocks get no update), and the
paper's ablations of HACBO: ``hacbo_no_curvature`` (v uniform 1/M), ``hacbo_no_refresh``
(micro-dev buffer never refreshed), ``hacbo_no_probation`` (no block ever enters probation),
``hacbo_debias`` (bias-corrected EMAs). ``--methods all`` runs all eight.

Learning rates: ``--lrs FILE`` (written by ``train.sweep``) maps method -> base learning rate;
a method missing from it uses the rate of the method it ablates (:data:`LR_FALLBACK`, e.g. every
``hacbo_*`` ablation uses ``hacbo``'s rate so the ablation changes one thing only), else the base
config's ``optim.lr``.

The report (per method over seeds): exact match mean with a 95% t confidence interval, final
training loss, divergences, wall time, energy when measured, the fraction of controlled
parameters in probation (HACBO) or frozen (BLAC) over time; paired t-tests of ``hacbo`` against
every other method over the seeds both completed (``scipy.stats.ttest_rel``, alpha = 0.05).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import yaml

from hacbo_jax.training import report as report_lib
from hacbo_jax.training.config import Config, ConfigError, config_to_dict, load_config
from hacbo_jax.training.stats import MeanCI, PairedTest, mean_ci, paired_ttest

__all__ = [
    "METHODS",
    "COMPARED_METHODS",
    "ABLATIONS",
    "LR_FALLBACK",
    "RunSpec",
    "method_overrides",
    "parse_methods",
    "load_lrs",
    "lr_for",
    "plan_runs",
    "run_state",
    "run_comparison",
    "write_comparison_report",
    "enable_compilation_cache",
    "main",
]

# method name -> the config overrides that make a base config run it.
METHODS: dict[str, tuple[str, ...]] = {
    "adamw": ("controller.kind=none",),
    "blac": ("controller.kind=blac",),
    "hacbo": ("controller.kind=hacbo",),
    "hacbo_gamma0": ("controller.kind=hacbo", "controller.hacbo.gamma=0"),
    "hacbo_no_curvature": ("controller.kind=hacbo", "controller.hacbo.curvature_weighting=false"),
    "hacbo_no_refresh": ("controller.kind=hacbo", "microdev.refresh_every=0"),
    "hacbo_no_probation": ("controller.kind=hacbo", "controller.hacbo.probation=false"),
    "hacbo_debias": ("controller.kind=hacbo", "controller.hacbo.debias=true"),
}
COMPARED_METHODS = ("adamw", "blac", "hacbo", "hacbo_gamma0")
ABLATIONS = ("hacbo_no_curvature", "hacbo_no_refresh", "hacbo_no_probation", "hacbo_debias")
LR_FALLBACK = {name: "hacbo" for name in ("hacbo_gamma0", *ABLATIONS)}
REFERENCE_METHOD = "hacbo"
ALPHA = 0.05


def method_overrides(method: str) -> tuple[str, ...]:
    """Config overrides of a named method (also sets ``method=<name>`` for the logs)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    return (*METHODS[method], f"method={method}")


def parse_methods(text: str) -> list[str]:
    """``"adamw,hacbo"`` -> ["adamw", "hacbo"]; ``"all"`` -> every method; checks the names."""
    names = (
        list(METHODS)
        if text.strip() == "all"
        else [m.strip() for m in text.split(",") if m.strip()]
    )
    if not names:
        raise ValueError(
            f"--methods {text!r}: give a comma-separated list of {', '.join(METHODS)}, or 'all'"
        )
    for name in names:
        method_overrides(name)
    if len(set(names)) != len(names):
        raise ValueError(f"--methods {text!r}: a method is listed twice")
    return names


def load_lrs(path: str | Path) -> dict[str, float]:
    """The ``lr`` mapping (method -> base learning rate) of a ``train.sweep`` output file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ValueError(f"--lrs {str(path)!r}: cannot be read ({e.strerror})") from None
    lrs = raw.get("lr") if isinstance(raw, dict) else None
    if not isinstance(lrs, dict) or not lrs:
        raise ValueError(
            f"--lrs {str(path)!r}: must be a YAML mapping with a non-empty 'lr' "
            "section of method: learning rate (as train.sweep writes it)"
        )
    out = {}
    for method, value in lrs.items():
        method_overrides(str(method))
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"--lrs {str(path)!r}: lr.{method} = {lrs[method]!r}: must be a positive number"
            )
        out[str(method)] = value
    return out


def lr_for(method: str, lrs: Mapping[str, float] | None) -> float | None:
    """The tuned rate of ``method``, else of the method it ablates, else None (base config)."""
    if not lrs:
        return None
    if method in lrs:
        return lrs[method]
    return lrs.get(LR_FALLBACK.get(method, ""))


@dataclasses.dataclass(frozen=True)
class RunSpec:
    method: str
    seed: int
    run_dir: Path
    config: Config


def plan_runs(
    base_config: str | Path,
    methods: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    lrs: Mapping[str, float] | None = None,
) -> list[RunSpec]:
    """The grid: one validated Config per (method, seed), ordered seed by seed (every method
    at seed 0, then at seed 1, ...) so that a comparison cut short still has paired seeds."""
    runs = []
    for seed in seeds:
        for method in methods:
            lr = lr_for(method, lrs)
            run_dir = Path(out_dir) / "runs" / method / f"seed{seed}"
            extra = [*overrides, *method_overrides(method), f"seed={seed}", f"output_dir={run_dir}"]
            if lr is not None:
                extra.append(f"optim.lr={lr!r}")
            runs.append(RunSpec(method, seed, run_dir, load_config(base_config, extra)))
    return runs


def _comparable(config: Mapping[str, Any]) -> dict:
    """Config as it reads back from YAML, without output_dir (the directory is the run's name)."""
    plain = yaml.safe_load(yaml.safe_dump(dict(config), sort_keys=True))
    plain.pop("output_dir", None)
    return plain


def run_state(spec: RunSpec) -> str:
    """``done`` (summary + same config), ``resume`` (checkpoint, same config, no summary),
    ``stale`` (a directory from a different config) or ``new``."""
    config_path = spec.run_dir / "config.yaml"
    if not config_path.is_file():
        return "stale" if spec.run_dir.exists() and any(spec.run_dir.iterdir()) else "new"
    try:
        saved = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError:
        return "stale"
    if not isinstance(saved, dict) or _comparable(saved) != _comparable(
        config_to_dict(spec.config)
    ):
        return "stale"
    if (spec.run_dir / "summary.json").is_file():
        return "done"
    checkpoints = spec.run_dir / "checkpoints"
    if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
        return "resume"
    return "stale"  # started but never checkpointed: nothing worth keeping


def enable_compilation_cache(cache_dir: str | Path) -> None:
    """JAX persistent compilation cache in ``cache_dir``, for every compiled program."""
    import jax

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(Path(cache_dir).resolve()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


BASE_EVAL_FILE = "base_model_eval.json"


def base_model_exact_match(cfg: Config) -> dict[str, Any]:
    """Exact match of the base model before any fine-tuning, on the runs' evaluation problems
    with the runs' decoding settings (the reference point of the comparison)."""
    from transformers import AutoTokenizer

    from hacbo_jax.models.qwen3 import Qwen3ForCausalLM
    from hacbo_jax.training.evaluate import evaluate_exact_match, prompt_length_for
    from hacbo_jax.training.run_parts import DTYPES, load_task_data

    model = Qwen3ForCausalLM.from_pretrained(
        cfg.model.path, dtype=DTYPES[cfg.model.dtype], param_dtype=DTYPES[cfg.model.param_dtype]
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    task = load_task_data(cfg)
    prompt_len = prompt_length_for([e.question for e in task.eval + task.pool], tokenizer)
    result = evaluate_exact_match(
        model,
        tokenizer,
        task.eval,
        batch_size=cfg.eval.batch_size,
        prompt_len=prompt_len,
        max_new_tokens=cfg.eval.max_new_tokens,
    )
    weights = Path(cfg.model.path) / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None
    return {
        "exact_match": float(result.exact_match),
        "n": int(result.num_examples),
        "model_sha256": digest,
        "key": _base_eval_key(cfg),
    }


def _base_eval_key(cfg: Config) -> dict:
    return _comparable(
        {
            "model": dataclasses.asdict(cfg.model),
            "data": dataclasses.asdict(cfg.data),
            "eval": dataclasses.asdict(cfg.eval),
            "microdev_pool": cfg.microdev.pool,
        }
    )


# ---------------------------------------------------------------------------------------------
# Statistics over the run directories.
# ---------------------------------------------------------------------------------------------


def block_parameter_counts(model_path: str | Path) -> np.ndarray:
    """Parameters per controlled block (layer) of the Qwen3 model at ``model_path``, f64[B].

    Computed from shapes only (``nnx.eval_shape``): the weights are not loaded.
    """
    import jax
    from flax import nnx

    from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
    from hacbo_jax.training.recipes import qwen3_labels

    config = Qwen3Config.from_hf(model_path)
    abstract = nnx.eval_shape(lambda: Qwen3ForCausalLM(config, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    labels = qwen3_labels(params)
    counts: dict[int, float] = {}
    for label, leaf in zip(jax.tree.leaves(labels), jax.tree.leaves(params)):
        block, sep, _ = label.partition("/")
        if sep and block.isdigit():
            counts[int(block)] = counts.get(int(block), 0.0) + float(np.prod(leaf.shape))
    return np.array([counts[b] for b in sorted(counts)], dtype=np.float64)


def controlled_fraction(
    run: report_lib.Run, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, fraction of controlled parameters in probation (HACBO) or frozen (BLAC)).

    ``weights``: parameters per block (None = blocks weigh the same). None without a controller.
    """
    key = "probation" if run.controller_kind == "hacbo" else "frozen"
    found = run.controller_matrix(key) if run.controller_kind else None
    if found is None:
        return None
    steps, mask = found  # mask: [B, T]
    w = np.ones(mask.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (mask.shape[0],):
        raise ValueError(
            f"{run.path}: {mask.shape[0]} controlled blocks in the log but "
            f"{w.shape[0]} block weights"
        )
    return steps, (w @ mask) / w.sum()


@dataclasses.dataclass
class MethodSummary:
    method: str
    runs: list[report_lib.Run]
    exact_match: MeanCI | None
    loss: MeanCI | None  # over runs with a finite final loss
    finite_losses: int
    diverged: int
    wall_time: MeanCI | None
    energy_kwh: MeanCI | None  # None unless every run measured energy
    energy_source: str
    fraction_mean: float | None  # time-averaged controlled fraction, mean over seeds
    fraction_final: float | None


def _ci_or_none(values: Sequence[float]) -> MeanCI | None:
    return mean_ci(values) if len(values) else None


def summarize_method(
    method: str, runs: Sequence[report_lib.Run], weights: np.ndarray | None = None
) -> MethodSummary:
    ems = [r.final_exact_match for r in runs if r.final_exact_match is not None]
    losses = [
        r.final_loss for r in runs if r.final_loss is not None and math.isfinite(r.final_loss)
    ]
    walls = [r.wall_time_s for r in runs if r.wall_time_s is not None]
    energies = [r.energy for r in runs]
    kwh = [e for e, _ in energies if e is not None]
    sources = sorted({s for _, s in energies if s})
    fractions = [controlled_fraction(r, weights) for r in runs]
    fractions = [f for f in fractions if f is not None and f[1].size]
    return MethodSummary(
        method=method,
        runs=list(runs),
        exact_match=_ci_or_none([100 * e for e in ems]),
        loss=_ci_or_none(losses),
        finite_losses=len(losses),
        diverged=sum(r.diverged for r in runs),
        wall_time=_ci_or_none(walls),
        energy_kwh=_ci_or_none(kwh) if runs and len(kwh) == len(runs) else None,
        energy_source=", ".join(sources) or "unknown",
        fraction_mean=float(np.mean([f.mean() for _, f in fractions])) if fractions else None,
        fraction_final=float(np.mean([f[-1] for _, f in fractions])) if fractions else None,
    )


def paired_against(
    reference: Sequence[report_lib.Run], other: Sequence[report_lib.Run], alpha: float = ALPHA
) -> PairedTest | None:
    """Paired t-test of exact match (%) over the seeds both methods completed."""
    ref = {r.seed: r.final_exact_match for r in reference if r.final_exact_match is not None}
    oth = {r.seed: r.final_exact_match for r in other if r.final_exact_match is not None}
    seeds = sorted(set(ref) & set(oth))
    if not seeds:
        return None
    return paired_ttest([100 * ref[s] for s in seeds], [100 * oth[s] for s in seeds], alpha)


# ---------------------------------------------------------------------------------------------
# Figures and report.
# ---------------------------------------------------------------------------------------------


def _fmt(x: float | None, fmt: str = "{:.2f}") -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return fmt.format(x)


def _fmt_ci(ci: MeanCI | None, fmt: str = "{:.2f}") -> str:
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
    return report_lib._save(fig, path)


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
    return report_lib._save(fig, path)


def _load_runs(
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
    by_method = _load_runs(out_dir, methods, seeds)
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
        *(
            [
                f"Base model before fine-tuning: {100 * base['exact_match']:.2f}% exact match on the "
                f"same {base['n']} problems (greedy decoding as in the runs); model.safetensors "
                f"sha256 `{base.get('model_sha256')}`.",
                "",
            ]
            if base
            else []
        ),
        "## Per method (mean over seeds, 95% t confidence interval in brackets)",
        "",
        "| method | runs | lr | exact match (%) | final train loss | diverged | wall time / run (s) "
        "| energy / run (kWh) | controlled params in probation / frozen: time mean, at end |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | --- | --- |",
    ]
    for s in summaries:
        lr = ((s.runs[0].config or {}).get("optim") or {}).get("lr")
        loss = _fmt_ci(s.loss, "{:.4f}")
        if s.finite_losses < len(s.runs):
            loss += f" ({s.finite_losses} of {len(s.runs)} finite)"
        energy = (
            _fmt_ci(s.energy_kwh, "{:.3g}") + f" ({s.energy_source})"
            if s.energy_kwh
            else f"n/a ({s.energy_source})"
        )
        fraction = (
            "n/a (no controller)"
            if s.fraction_mean is None
            else f"{100 * s.fraction_mean:.1f}%, {100 * s.fraction_final:.1f}%"
        )
        lines.append(
            " | ".join(
                [
                    f"| {s.method}",
                    str(len(s.runs)),
                    _fmt(lr, "{:.3g}"),
                    _fmt_ci(s.exact_match),
                    loss,
                    f"{s.diverged}/{len(s.runs)}",
                    _fmt(s.wall_time.mean if s.wall_time else None, "{:.0f}"),
                    energy,
                    fraction,
                ]
            )
            + " |"
        )
    lines.append("")

    reference = by_method.get(REFERENCE_METHOD) or []
    others = [m for m in methods if m != REFERENCE_METHOD and by_method[m]]
    if reference and others:
        lines += [
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
                f"| {method} | {test.n} | {test.mean_diff:+.2f} | {ci} | {_fmt(test.t)} | "
                f"{_fmt(test.p, '{:.3g}')} | {verdict} |"
            )
        lines.append("")

    # Figures: ours (CI, controlled fraction) and the training report's, on one run per method.
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
        slug = report_lib._slug(r.method)
        figures.append(report_lib.plot_multipliers(r, report_dir / f"multipliers_{slug}.png"))
        figures.append(report_lib.plot_status(r, report_dir / f"status_{slug}.png"))
    for r, label in zip(shown, labels):
        r.label = label
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
    if timing:
        lines += ["## Wall time", ""]
        lines += [f"- {key}: {value}" for key, value in timing.items()]
        lines.append("")
    path = report_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Running the grid.
# ---------------------------------------------------------------------------------------------


def _default_run_fn(cfg: Config, *, resume: bool, show_progress: bool) -> dict:
    from hacbo_jax.training.finetune import run

    return run(cfg, resume=resume, show_progress=show_progress)


def run_comparison(
    base_config: str | Path,
    methods: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    lrs: Mapping[str, float] | None = None,
    report_dir: str | Path | None = None,
    run_fn: Callable[..., dict] | None = None,
    show_progress: bool = False,
    command: str | None = None,
    log: Callable[[str], None] = print,
    base_eval: bool = True,
) -> Path:
    """Runs the missing (method, seed) runs, then writes the report; returns report.md.

    ``base_eval``: also measure the base model's exact match before fine-tuning (once; kept in
    ``OUT/base_model_eval.json``) as the report's reference line.

    ``run_fn(cfg, resume=bool, show_progress=bool) -> summary`` defaults to
    ``train.finetune.run``.
    """
    run_fn = run_fn or _default_run_fn
    out_dir = Path(out_dir)
    specs = plan_runs(base_config, methods, seeds, out_dir, overrides, lrs)
    started = time.perf_counter()
    executed = skipped = 0
    base_path = out_dir / BASE_EVAL_FILE
    if base_eval and specs:
        saved = json.loads(base_path.read_text()) if base_path.is_file() else {}
        if saved.get("key") != _base_eval_key(specs[0].config):
            log("base model (no fine-tuning): evaluating")
            result = base_model_exact_match(specs[0].config)
            out_dir.mkdir(parents=True, exist_ok=True)
            base_path.write_text(json.dumps(result, indent=1) + "\n")
            log(f"base model: exact match {100 * result['exact_match']:.1f}%")
    for i, spec in enumerate(specs, 1):
        state = run_state(spec)
        tag = f"[{i}/{len(specs)}] {spec.method} seed {spec.seed}"
        if state == "done":
            skipped += 1
            log(f"{tag}: finished before, skipped")
            continue
        if state == "stale":
            log(f"{tag}: {spec.run_dir} holds a run of another config; starting it afresh")
            shutil.rmtree(spec.run_dir)
        log(f"{tag}: {'resuming' if state == 'resume' else 'running'}")
        t0 = time.perf_counter()
        summary = run_fn(spec.config, resume=state == "resume", show_progress=show_progress)
        executed += 1
        log(
            f"{tag}: exact match {100 * summary['final_exact_match']:.1f}%, final loss "
            f"{summary['final_train_loss']:.4f}{', DIVERGED' if summary['diverged'] else ''} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    elapsed = time.perf_counter() - started
    timing_path = out_dir / "timing.json"
    history = json.loads(timing_path.read_text()) if timing_path.is_file() else []
    history.append(
        {
            "command": command,
            "runs": len(specs),
            "executed": executed,
            "skipped": skipped,
            "elapsed_s": round(elapsed, 1),
            "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        }
    )
    timing_path.parent.mkdir(parents=True, exist_ok=True)
    timing_path.write_text(json.dumps(history, indent=1) + "\n")
    run_walls = [
        json.loads((s.run_dir / "summary.json").read_text()).get("wall_time_s") or 0.0
        for s in specs
        if (s.run_dir / "summary.json").is_file()
    ]
    timing = {
        "this invocation": f"{elapsed:.0f} s ({executed} runs executed, {skipped} skipped as "
        "finished), on this machine",
        "sum of the runs' own wall times (compilation and evaluation included)": f"{sum(run_walls):.0f} s over {len(run_walls)} runs",
    }
    if len(history) > 1:
        timing["all invocations so far"] = (
            f"{sum(h['elapsed_s'] for h in history):.0f} s in "
            f"{len(history)} invocations (see {timing_path.name})"
        )
    report = write_comparison_report(
        out_dir, methods, seeds, report_dir, command=command, timing=timing
    )
    log(
        f"comparison: {executed} runs executed, {skipped} skipped, {elapsed:.0f} s; "
        f"report: {report}"
    )
    return report


def _parse_seeds(args: argparse.Namespace) -> list[int]:
    if args.seed_list:
        try:
            seeds = [int(s) for s in args.seed_list.split(",") if s.strip()]
        except ValueError:
            raise ValueError(
                f"--seed-list {args.seed_list!r}: must be comma-separated non-negative integers"
            ) from None
        if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
            raise ValueError(
                f"--seed-list {args.seed_list!r}: must be distinct non-negative integers"
            )
        return seeds
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: must be >= 1")
    if args.first_seed < 0:
        raise ValueError(f"--first-seed {args.first_seed}: must be >= 0")
    return list(range(args.first_seed, args.first_seed + args.seeds))


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m train.compare") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="base config (YAML)")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first..first+n-1")
    parser.add_argument("--seed-list", default=None, help="explicit seeds, e.g. 0,3,7")
    parser.add_argument(
        "--methods",
        default=",".join(COMPARED_METHODS),
        help=f"comma-separated, from {', '.join(METHODS)}; or 'all'",
    )
    parser.add_argument("--lrs", default=None, help="method -> lr file written by train.sweep")
    parser.add_argument(
        "--out", default="runs/compare", help="runs go to OUT/runs/<method>/seed<k>"
    )
    parser.add_argument("--report-dir", default=None, help="report.md and figures (default OUT)")
    parser.add_argument(
        "--jax-cache", default=None, help="persistent compilation cache (default OUT/jax_cache)"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="only rebuild the report from the finished runs"
    )
    parser.add_argument("--progress", action="store_true", help="show each run's progress bar")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides applied to the base config for every run",
    )
    args = parser.parse_args(argv)
    command = f"{prog} " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    try:
        seeds = _parse_seeds(args)
        methods = parse_methods(args.methods)
        lrs = load_lrs(args.lrs) if args.lrs else None
        if args.report_only:
            report = write_comparison_report(
                args.out,
                methods,
                seeds,
                args.report_dir,
                command=command,
                command_label="Report rebuilt from existing runs with:",
            )
            print(f"wrote {report}")
            return 0
        # validate every run's config before the first one starts
        plan_runs(args.config, methods, seeds, args.out, args.overrides, lrs)
    except (ConfigError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    enable_compilation_cache(args.jax_cache or Path(args.out) / "jax_cache")
    run_comparison(
        args.config,
        methods,
        seeds,
        args.out,
        overrides=args.overrides,
        lrs=lrs,
        report_dir=args.report_dir,
        show_progress=args.progress,
        command=command,
    )
    return 0
