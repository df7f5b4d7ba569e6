"""lr x wd trajectory-invariance sweep: is the loss a function of gamma = eta * lambda?

Reference: ``docs/algorithm.md`` (lr·wd sweep; arXiv 2509.25049). With AdamW the per-step
weight-decay shrink is gamma_t = eta_t * lambda (``optax.adamw`` scales the decay by the scheduled
LR, as torch does), so (c eta, lambda / c) keeps gamma_t. The paper's claim: curves first overlap
for equal eta, and after enough training (T gamma >~ 1) for equal gamma.

Grid: eta_i = eta_0 2^i, lambda_j = lambda_0 2^j, i, j in {-span..span}. Families: ``"gamma"``
(i + j = 0), ``"eta"`` (i = 0), ``"lambda"`` (j = 0) and the noise floor ``"noise"`` (the anchor
with ``noise_seeds`` more seeds). Everything here is a pure function of per-run curves except
:func:`run_sweep`, which calls a user ``train_fn(lr, wd, seed) -> curve`` per run.

Metrics (our reading, as in the reference): smooth each curve by a centred moving mean of ``window``
points; on steps t in [0.1 T, T], spread_F(t) = max_r L~_r(t) - min_r L~_r(t) over runs r of F,
S_F = mean_t spread_F(t), S_0 from the seeds. Verdict "gamma-invariance holds" iff
S_gamma <= noise_factor * S_0 and S_gamma < S_eta. Salient direction (full grid): fit the final
loss to a quadratic in (log2 eta, log2 lambda) and report the angle between the fitted Hessian's
flattest eigenvector and (1, -1)/sqrt 2 (0 degrees: the loss depends on gamma only).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

FAMILIES = ("gamma", "eta", "lambda", "noise")
VERDICT_HOLDS = "gamma-invariance holds"
VERDICT_FAILS = "gamma-invariance not shown"

Curve = Sequence[Mapping[str, Any]]  # records with at least "step" and the metric


class RunSpec(NamedTuple):
    """One run of the grid: exponents (i, j), its eta, lambda, seed and the families it is in."""

    i: int
    j: int
    lr: float
    wd: float
    seed: int
    families: tuple[str, ...]

    @property
    def gamma(self) -> float:
        return self.lr * self.wd

    @property
    def name(self) -> str:
        return f"i{self.i:+d}_j{self.j:+d}_s{self.seed}"


def grid_runs(
    anchor: tuple[float, float],
    *,
    span: int = 2,
    families: Sequence[str] = FAMILIES,
    seed: int = 0,
    noise_seeds: int = 2,
    full: bool = False,
) -> list[RunSpec]:
    """The runs of the sweep, each once, with the families it belongs to.

    The anchor (0, 0) is in every family; with the defaults there are 13 distinct family runs
    plus 2 noise seeds = 15 runs. ``full=True`` adds the rest of the (2 span + 1)^2 grid (all 25
    with span 2; their ``families`` may be empty) and keeps the noise seeds. Runs are ordered by
    (seed, i, j).
    """
    if not (isinstance(span, int) and span >= 1):
        raise ValueError(f"span must be an integer >= 1, got {span!r}")
    if not (isinstance(noise_seeds, int) and noise_seeds >= 0):
        raise ValueError(f"noise_seeds must be an integer >= 0, got {noise_seeds!r}")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown}; allowed: {FAMILIES}")
    eta0, lam0 = anchor
    if not (eta0 > 0 and lam0 > 0):
        raise ValueError(f"anchor must be (eta_0 > 0, lambda_0 > 0), got {anchor!r}")
    members: dict[tuple[int, int, int], list[str]] = {}
    steps = range(-span, span + 1)
    if full:
        for i in steps:
            for j in steps:
                members.setdefault((i, j, seed), [])
    for k in steps:
        if "gamma" in families:
            members.setdefault((k, -k, seed), []).append("gamma")
        if "eta" in families:
            members.setdefault((0, k, seed), []).append("eta")
        if "lambda" in families:
            members.setdefault((k, 0, seed), []).append("lambda")
    if "noise" in families:
        for s in range(seed, seed + noise_seeds + 1):
            members.setdefault((0, 0, s), []).append("noise")
    return [
        RunSpec(i, j, eta0 * 2.0**i, lam0 * 2.0**j, s, tuple(members[i, j, s]))
        for (i, j, s) in sorted(members, key=lambda k: (k[2], k[0], k[1]))
    ]


def smooth(values: Sequence[float], window: int = 5) -> np.ndarray:
    """Centred moving mean over ``window`` points (odd); near the ends the window shrinks to
    the points that exist (our reading)."""
    if not (isinstance(window, int) and window >= 1 and window % 2 == 1):
        raise ValueError(f"window must be an odd integer >= 1, got {window!r}")
    values = np.asarray(values, np.float64)
    kernel = np.ones(window)
    sums = np.convolve(values, kernel, mode="same")
    counts = np.convolve(np.ones_like(values), kernel, mode="same")
    return sums / counts


def _curve_arrays(curve: Curve, metric: str) -> tuple[np.ndarray, np.ndarray]:
    steps = np.asarray([r["step"] for r in curve], np.float64)
    values = np.asarray([r[metric] for r in curve], np.float64)
    return steps, values


def spread_over_time(
    curves: Sequence[Curve], *, metric: str = "train_loss", window: int = 5, start: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """(steps, spread(t)) for t in [start * T, T]: max minus min of the smoothed curves.

    All curves must be logged at the same steps; T is the last logged step.
    """
    if len(curves) < 2:
        raise ValueError(f"a spread needs at least 2 curves, got {len(curves)}")
    steps, _ = _curve_arrays(curves[0], metric)
    smoothed = []
    for k, curve in enumerate(curves):
        s, v = _curve_arrays(curve, metric)
        if s.shape != steps.shape or not np.array_equal(s, steps):
            raise ValueError(f"curve {k} is logged at other steps than curve 0")
        smoothed.append(smooth(v, window))
    smoothed = np.stack(smoothed)
    keep = steps >= start * steps[-1]
    return steps[keep], (smoothed.max(axis=0) - smoothed.min(axis=0))[keep]


def mean_spread(curves: Sequence[Curve], **kwargs) -> float:
    """S_F: the mean over t in [0.1 T, T] of :func:`spread_over_time`."""
    return float(np.mean(spread_over_time(curves, **kwargs)[1]))


def verdict(s_gamma: float, s_eta: float, s_noise: float, *, noise_factor: float = 2.0) -> str:
    """ "gamma-invariance holds" iff S_gamma <= noise_factor * S_0 and S_gamma < S_eta."""
    holds = s_gamma <= noise_factor * s_noise and s_gamma < s_eta
    return VERDICT_HOLDS if holds else VERDICT_FAILS


def salient_angle(
    log2_lr: Sequence[float], log2_wd: Sequence[float], loss: Sequence[float]
) -> float:
    """Angle in degrees [0, 90] between the flattest eigenvector of the least-squares quadratic
    L ~ c + b.x + x^T A x / 2 in x = (log2 eta, log2 lambda) and (1, -1)/sqrt 2.

    "Flattest" = the eigenvector whose eigenvalue has the smallest magnitude (our reading).
    """
    x, y, z = (np.asarray(a, np.float64) for a in (log2_lr, log2_wd, loss))
    if len(z) < 6:
        raise ValueError(f"a quadratic in two variables needs >= 6 runs, got {len(z)}")
    design = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
    coef, *_ = np.linalg.lstsq(design, z, rcond=None)
    hessian = np.array([[2 * coef[3], coef[4]], [coef[4], 2 * coef[5]]])
    eigenvalues, vectors = np.linalg.eigh(hessian)
    flattest = vectors[:, np.argmin(np.abs(eigenvalues))]
    cosine = abs(flattest @ np.array([1.0, -1.0]) / math.sqrt(2.0))
    return float(np.degrees(np.arccos(np.clip(cosine, 0.0, 1.0))))


def t_gamma(total_steps: int, lr: float, wd: float) -> float:
    """T * gamma: the number of weight-decay timescales 1/gamma the run covers."""
    return float(total_steps * lr * wd)


def check_t_gamma(total_steps: int, lr: float, wd: float, *, stacklevel: int = 2) -> float:
    """Returns T * gamma and warns (``UserWarning``) when it is below 1: gamma-invariance is
    only expected once T * gamma >~ 1 (expect eta-invariance only)."""
    value = t_gamma(total_steps, lr, wd)
    if value < 1.0:
        warnings.warn(
            f"T x gamma = {total_steps} x {lr * wd:.3g} = {value:.3g} < 1: the runs cover less "
            "than one weight-decay timescale, so expect eta-invariance only",
            UserWarning,
            stacklevel=stacklevel,
        )
    return value


@dataclasses.dataclass
class SweepResult:
    """Outcome of a sweep.

    Attributes:
      runs: the run specs; curves: name -> its curve (records); metric: the compared series.
      spreads: family -> S_F (``"noise"`` is S_0); ratios: family -> S_F / S_0.
      verdict: see :func:`verdict`; angle: :func:`salient_angle` on the full grid (else None).
      t_gamma: T * gamma at the anchor.
    """

    runs: list[RunSpec]
    curves: dict[str, list[dict[str, Any]]]
    metric: str
    spreads: dict[str, float]
    ratios: dict[str, float]
    verdict: str | None
    angle: float | None
    t_gamma: float


def analyse(
    runs: Sequence[RunSpec],
    curves: Mapping[str, Curve],
    *,
    anchor: tuple[float, float],
    metric: str = "train_loss",
    final_metric: str | None = None,
    window: int = 5,
    noise_factor: float = 2.0,
) -> SweepResult:
    """Spreads, ratios, verdict, salient angle (when the full grid is there) and T * gamma.

    ``final_metric`` (default: ``metric``) is the series whose last value the salient-direction
    fit uses (the reference fits the final validation loss).
    """
    final_metric = final_metric or metric
    spreads = {}
    for family in FAMILIES:
        members = [curves[r.name] for r in runs if family in r.families]
        if len(members) >= 2:
            spreads[family] = mean_spread(members, metric=metric, window=window)
    s0 = spreads.get("noise")
    ratios = {
        f: (s / s0 if s0 else math.inf)
        for f, s in spreads.items()
        if f != "noise" and s0 is not None
    }
    decided = None
    if {"gamma", "eta", "noise"} <= set(spreads):
        decided = verdict(
            spreads["gamma"], spreads["eta"], spreads["noise"], noise_factor=noise_factor
        )
    grid = {(r.i, r.j): r for r in runs if r.seed == runs[0].seed}
    span = max(max(abs(r.i), abs(r.j)) for r in runs)
    angle = None
    if len(grid) == (2 * span + 1) ** 2:
        finals = [float(curves[r.name][-1][final_metric]) for r in grid.values()]
        angle = salient_angle(
            [math.log2(r.lr) for r in grid.values()],
            [math.log2(r.wd) for r in grid.values()],
            finals,
        )
    total = int(next(iter(curves.values()))[-1]["step"])
    return SweepResult(
        list(runs),
        {k: list(v) for k, v in curves.items()},
        metric,
        spreads,
        ratios,
        decided,
        angle,
        t_gamma(total, *anchor),
    )


def run_sweep(
    train_fn: Callable[[float, float, int], Curve],
    *,
    anchor: tuple[float, float],
    total_steps: int,
    span: int = 2,
    families: Sequence[str] = FAMILIES,
    seed: int = 0,
    noise_seeds: int = 2,
    full: bool = False,
    metric: str = "train_loss",
    final_metric: str | None = None,
    window: int = 5,
    noise_factor: float = 2.0,
    log_dir: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> SweepResult:
    """Runs ``train_fn(lr, wd, seed)`` for every run of :func:`grid_runs` and analyses the curves.

    ``train_fn`` trains the base optimiser (plain AdamW: a controller chained after it would
    change gamma per group) for ``total_steps`` and returns its curve, a list of records with
    ``step`` and the metrics (reference: step, eta, lambda, gamma, train_loss, val_loss, grad_norm
    every Delta steps). With ``log_dir`` each curve is also written as ``{run}.jsonl``. Prints
    (``echo``) T * gamma at the anchor and warns when it is below 1.
    """
    runs = grid_runs(
        anchor, span=span, families=families, seed=seed, noise_seeds=noise_seeds, full=full
    )
    value = check_t_gamma(total_steps, *anchor, stacklevel=3)  # point at run_sweep's caller
    echo(f"[lrwd] T x gamma = {total_steps} x {anchor[0] * anchor[1]:.3g} = {value:.3g}")
    curves = {}
    for k, run in enumerate(runs):
        echo(f"[lrwd] run {k + 1}/{len(runs)}: {run.name} lr={run.lr:.3g} wd={run.wd:.3g}")
        curve = [
            {**dict(r), "lr": run.lr, "wd": run.wd, "gamma": run.gamma}
            for r in train_fn(run.lr, run.wd, run.seed)
        ]
        if not curve:
            raise ValueError(f"train_fn returned an empty curve for {run.name}")
        curves[run.name] = curve
        if log_dir is not None:
            path = Path(log_dir) / f"{run.name}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in curve))
    return analyse(
        runs,
        curves,
        anchor=anchor,
        metric=metric,
        final_metric=final_metric,
        window=window,
        noise_factor=noise_factor,
    )


def write_results(result: SweepResult, directory: str | Path, *, prefix: str = "lrwd") -> dict:
    """Writes ``{prefix}.csv`` (one row per run: exponents, eta, lambda, gamma, seed, families,
    final metric), ``{prefix}.json`` (spreads, ratios, verdict, angle, T * gamma) and
    ``{prefix}.png`` (the curves of each family and the spreads over time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {k: directory / f"{prefix}.{k}" for k in ("csv", "json", "png")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "i", "j", "lr", "wd", "gamma", "seed", "families", result.metric])
        for r in result.runs:
            final = result.curves[r.name][-1][result.metric]
            writer.writerow(
                [r.name, r.i, r.j, r.lr, r.wd, r.gamma, r.seed, "+".join(r.families), final]
            )
    summary = {
        "metric": result.metric,
        "spreads": result.spreads,
        "ratios_to_noise": result.ratios,
        "verdict": result.verdict,
        "salient_angle_deg": result.angle,
        "t_gamma": result.t_gamma,
    }
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")

    shown = [f for f in ("gamma", "eta", "lambda", "noise") if f in result.spreads]
    fig, axes = plt.subplots(1, len(shown) + 1, figsize=(4.5 * (len(shown) + 1), 4), squeeze=False)
    for ax, family in zip(axes[0], shown):
        for r in result.runs:
            if family in r.families:
                steps, values = _curve_arrays(result.curves[r.name], result.metric)
                ax.plot(
                    steps, smooth(values), lw=1, label=f"eta={r.lr:.2g} wd={r.wd:.2g} s{r.seed}"
                )
        ax.set_title(f"F_{family}: S = {result.spreads[family]:.3g}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(result.metric)
        ax.legend(fontsize=6)
    ax = axes[0][-1]
    for family in shown:
        members = [result.curves[r.name] for r in result.runs if family in r.families]
        steps, spread = spread_over_time(members, metric=result.metric)
        ax.plot(steps, spread, label=family)
    ax.set_yscale("log")
    ax.set_title(f"spread over time; {result.verdict}", fontsize=9)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.suptitle(f"lr x wd sweep, T x gamma = {result.t_gamma:.3g}")
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths
