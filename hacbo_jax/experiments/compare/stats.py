"""Statistics of a comparison's finished runs: per-method means with confidence intervals,
paired t-tests against the reference method, and the controlled fraction of the parameters."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from hacbo_jax.experiments import report as report_lib
from hacbo_jax.experiments.methods import ALPHA
from hacbo_jax.experiments.stats import MeanCI, PairedTest, mean_ci, paired_ttest

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
    from hacbo_jax.trainer.recipes import qwen3_labels

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
    HACBO logs with ``probation_steps`` (updates applied in probation, cumulative) give the
    share of each logging window's updates in probation, which also counts a block that
    entered and left probation at one measurement; older logs, the logged ``probation`` state.
    """
    if not run.controller_kind:
        return None
    found = None
    if run.controller_kind == "hacbo":
        counted = run.controller_matrix("probation_steps")
        if counted is not None:
            steps, counts = counted  # [B, T] cumulative
            window = np.diff(np.concatenate([[0], steps])).astype(np.float64)
            increments = np.diff(np.concatenate([np.zeros((counts.shape[0], 1)), counts], 1), axis=1)
            found = steps, increments / np.maximum(window, 1.0)
    if found is None:
        key = "probation" if run.controller_kind == "hacbo" else "frozen"
        found = run.controller_matrix(key)
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
