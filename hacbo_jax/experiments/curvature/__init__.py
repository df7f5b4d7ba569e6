"""The curvature probe: per-group Hessian estimates and their rank correlation with HACBO's
curvature EMA (``probe``), and the ``hacbo-probe-curvature`` command (``run``)."""

from hacbo_jax.experiments.curvature.probe import (
    GroupCurvature,
    RankCorrelation,
    group_hvp,
    hutchinson_samples,
    power_iteration,
    probe_curvature,
    rank_correlations,
    spearman,
)

__all__ = [
    "GroupCurvature",
    "RankCorrelation",
    "group_hvp",
    "hutchinson_samples",
    "power_iteration",
    "probe_curvature",
    "rank_correlations",
    "spearman",
]
