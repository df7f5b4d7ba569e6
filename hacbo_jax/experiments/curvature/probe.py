"""HVP curvature probe: does HACBO's proxy rank (block, sub-module) groups as curvature does?

Reference: ``docs/algorithm.md`` (curvature probe) (a diagnostic, no optax transform). For every
group G = (b, m) of a label tree (``"{block}/{submodule}"`` leaves, as for :func:`hacbo_jax.hacbo`;
``groups="blocks"`` makes G = b) and a scalar loss L(params) on a fixed probe set:

- f_G(theta_G) = L(merge(theta_G, theta_rest)) and
  hvp_G(v) = ``jax.jvp(jax.grad(f_G), (theta_G,), (v,))[1]`` (forward-over-reverse) = H_GG v.
- lambda_G: power iteration from v ~ N(0, I) (key ``fold_in(PRNGKey(seed), group_id)``),
  lambda_i = v.Hv (Rayleigh quotient), v <- Hv/||Hv||, until
  |lambda_i - lambda_{i-1}| / (|lambda_{i-1}| + 1e-6) < tol or 100 HVPs (PyHessian's rule).
  This finds the eigenvalue of largest |lambda|; if it is negative the row is flagged
  ``"negative"`` and a second power iteration on H_GG - lambda I (lambda added back) gives the
  largest algebraic eigenvalue ``lambda_max`` (our reading).
- T_G: Hutchinson trace with Rademacher probes z, t_j = z.H_GG z, running mean stopped by the same
  rule (PyHessian; first comparison against 0), at most ``trace_max_probes``; mean and SE.
  ``trace_mode="shared"``: z on all controlled parameters, one full HVP u = Hz per probe gives
  t_{G,j} = z_G.u_G for every G at once (unbiased: E[z_G^T H_GG' z_G'] = 0 for G != G').
- r_G = ||g_G|| / sqrt(n_G) (the RMS gradient HACBO's curvature EMA averages) and, given a
  HACBO state, c_G = its (raw) curvature EMA.

:func:`rank_correlations` then gives Spearman rho (average ranks for ties, =
``scipy.stats.spearmanr``) of a proxy against a curvature (i) inside each block, (ii) pooled and
(iii) across blocks per sub-module type, each with a permutation p-value.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats

from hacbo_jax.controllers import _groups

PyTree = Any

GROUPINGS = ("submodules", "blocks")
TRACE_MODES = ("per_group", "shared")
HVP_FORMS = ("restricted", "masked")
# Relative-change floor of PyHessian's stop rule: |x_i - x_{i-1}| / (|x_{i-1}| + 1e-6).
_STOP_FLOOR = 1e-6


@dataclasses.dataclass(frozen=True)
class GroupCurvature:
    """One row of the probe table (reference: "Record per group").

    Attributes:
      block: b.
      submodule: m (``"*"`` with ``groups="blocks"``).
      size: n_G, number of coordinates.
      eigenvalue: lambda_G, the eigenvalue of H_GG of largest magnitude (signed).
      eigenvalue_iters: HVPs the power iteration used.
      eigenvalue_max: the largest algebraic eigenvalue (= ``eigenvalue`` unless flagged).
      trace: T_G, Hutchinson estimate of tr(H_GG).
      trace_se: standard error of ``trace`` (std with ddof 1 / sqrt(probes); NaN for 1 probe).
      trace_probes: probes used.
      trace_per_param: T_G / n_G.
      rms_grad: r_G = ||g_G||_2 / sqrt(n_G) on the probe set.
      curvature_ema: c_G from a HACBO state, NaN if none was given (or ``groups="blocks"``).
      flag: ``""``, or ``"negative"`` when ``eigenvalue`` < 0, ``"not_converged"`` when the
        power iteration stopped at ``max_iters`` without meeting its rule (joined by ``";"``).
    """

    block: int
    submodule: str
    size: int
    eigenvalue: float
    eigenvalue_iters: int
    eigenvalue_max: float
    trace: float
    trace_se: float
    trace_probes: int
    trace_per_param: float
    rms_grad: float
    curvature_ema: float
    flag: str


class _Group(NamedTuple):
    group_id: int
    block: int
    submodule: str
    leaf_index: tuple[int, ...]


def _group_list(layout: _groups.GroupLayout, leaves: Sequence[Any], groups: str) -> list[_Group]:
    """Groups in (block, sub-module) order with the indices of their array leaves."""
    _groups.check_groups_present(layout, leaves)
    num_m = layout.num_submodules
    members: dict[tuple[int, int], list[int]] = {}
    for i, (leaf, b, m) in enumerate(zip(leaves, layout.leaf_block, layout.leaf_submodule)):
        if b == _groups.UNCONTROLLED or not _groups._is_array(leaf):
            continue
        key = (b, m if groups == "submodules" else 0)
        members.setdefault(key, []).append(i)
    out = []
    for (b, m), idx in sorted(members.items()):
        if groups == "submodules":
            out.append(_Group(b * num_m + m, b, layout.submodules[m], tuple(idx)))
        else:
            out.append(_Group(b, b, "*", tuple(idx)))
    return out


def _safe_normalise(tree: PyTree) -> PyTree:
    norm = optax.tree_utils.tree_norm(tree)
    return optax.tree_utils.tree_scale(
        jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0), tree
    )


def power_iteration(
    matvec: Callable[[PyTree], PyTree],
    v0: PyTree,
    *,
    tol: float = 1e-3,
    max_iters: int = 100,
    shift: float = 0.0,
) -> tuple[float, int, bool]:
    """Eigenvalue of largest magnitude of the symmetric operator ``matvec - shift * I``, plus shift.

    PyHessian's loop (``hessian.eigenvalues``): v = v0/||v0||; repeat w = A v, lambda_i = v.w,
    v = w/||w|| until |lambda_i - lambda_{i-1}| / (|lambda_{i-1}| + 1e-6) < ``tol`` or
    ``max_iters`` products. A host loop around ``matvec`` (pass a jitted one): one compiled
    product, not a compiled loop (which took minutes to compile for a tiny Qwen3 on CPU).
    A zero operator gives 0 after two products. Returns (lambda + shift, number of products,
    whether the stop rule was met).
    """
    tree = optax.tree_utils

    def step(v):
        w = matvec(v)
        if shift:
            w = tree.tree_add_scale(w, -shift, v)
        return float(tree.tree_vdot(v, w)), _safe_normalise(w)

    lam, v = step(_safe_normalise(v0))
    iters, converged = 1, False
    while iters < max_iters and not converged:
        new_lam, v = step(v)
        iters += 1
        converged = abs(new_lam - lam) / (abs(lam) + _STOP_FLOOR) < tol
        lam = new_lam
    return lam + shift, iters, converged


def hutchinson_samples(
    matvec: Callable[[PyTree], PyTree],
    like: PyTree,
    key: jax.Array,
    *,
    tol: float = 1e-3,
    max_probes: int = 100,
    split: Callable[[PyTree, PyTree], jax.Array] | None = None,
) -> np.ndarray:
    """Hutchinson probes t_j = z_j . A z_j, z_j Rademacher (key ``fold_in(key, j)``).

    Stops when the running mean (initially 0, as in PyHessian's ``hessian.trace``) changes by less
    than ``tol`` relative, or after ``max_probes``. With ``split(z, u)`` -> f[G] the probe yields
    one sample per group (``trace_mode="shared"``) and the rule must hold for every group.
    Returns the samples, f64[probes] or f64[probes, G].
    """
    measure = split if split is not None else optax.tree_utils.tree_vdot
    samples: list[np.ndarray] = []
    mean = 0.0
    for j in range(max_probes):
        z = optax.tree_utils.tree_random_like(
            jax.random.fold_in(key, j), like, sampler=jax.random.rademacher
        )
        samples.append(np.asarray(measure(z, matvec(z)), np.float64))
        new_mean = np.mean(samples, axis=0)
        stop = np.all(np.abs(new_mean - mean) / (np.abs(mean) + _STOP_FLOOR) < tol)
        mean = new_mean
        if stop:
            break
    return np.asarray(samples)


def _mean_se(samples: np.ndarray) -> tuple[float, float]:
    samples = np.asarray(samples, np.float64)
    mean = float(np.mean(samples))
    se = float(np.std(samples, ddof=1) / math.sqrt(len(samples))) if len(samples) > 1 else math.nan
    return mean, se


def _curvature_from_state(hacbo_state: Any, num_b: int, num_m: int) -> np.ndarray:
    """c[B, M] from a HACBOState, an optimiser state holding one, or a [B, M] array."""
    if hacbo_state is None:
        return np.full((num_b, num_m), np.nan)
    if isinstance(hacbo_state, (np.ndarray, jax.Array)):
        curvature = hacbo_state
    elif hasattr(hacbo_state, "curvature"):
        curvature = hacbo_state.curvature
    else:
        found = optax.tree_utils.tree_get(hacbo_state, "HACBOState")
        if found is None:
            raise ValueError(
                "hacbo_state must be a HACBOState, an optimiser state containing one, or a "
                f"[B, M] array; got {type(hacbo_state).__name__} without a HACBOState"
            )
        curvature = found.curvature
    curvature = np.asarray(curvature, np.float64)
    if curvature.shape != (num_b, num_m):
        raise ValueError(
            f"hacbo_state curvature has shape {curvature.shape} but the labels give "
            f"(B, M) = {(num_b, num_m)}; was it made with the same labels?"
        )
    return curvature


def _restricted_hvp(
    loss_of_leaves: Callable[[list[Any]], jax.Array], index: tuple[int, ...]
) -> Callable[[list[Any], list[Any]], list[Any]]:
    """(all leaves, v on the leaves ``index``) -> H_GG v, forward-over-reverse.

    f_G(theta_G) = L(merge(theta_G, theta_rest)); H_GG v = jvp(grad f_G, (theta_G,), (v,)).
    """

    def f(sub, all_leaves):
        merged = list(all_leaves)
        for i, x in zip(index, sub):
            merged[i] = x
        return loss_of_leaves(merged)

    def hvp(all_leaves, v):
        sub = [all_leaves[i] for i in index]
        return jax.jvp(lambda s: jax.grad(f)(s, all_leaves), (sub,), (v,))[1]

    return hvp


def group_hvp(
    loss_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    labels: PyTree | Callable[[PyTree], PyTree],
    block: int,
    submodule: str | None = None,
    *,
    submodules: Sequence[str] | None = None,
) -> Callable[[list[Any]], list[Any]]:
    """hvp_G for G = (``block``, ``submodule``) (``submodule=None``: the whole block) at ``params``.

    The returned function maps v, a list of arrays shaped like the group's leaves (in the label
    tree's flattening order), to H_GG v as the same kind of list.
    """
    layout = _groups.resolve_layout(labels, params, submodules)
    leaves = _groups.flatten_like(layout, params, "params")
    grouping = "blocks" if submodule is None else "submodules"
    for g in _group_list(layout, leaves, grouping):
        if g.block == block and (submodule is None or g.submodule == submodule):
            hvp = _restricted_hvp(lambda x: loss_fn(layout.treedef.unflatten(x)), g.leaf_index)
            return lambda v: hvp(leaves, list(v))
    raise ValueError(
        f"no group (block={block!r}, submodule={submodule!r}); blocks 0..{layout.num_blocks - 1}, "
        f"sub-modules {layout.submodules}"
    )


def probe_curvature(
    loss_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    labels: PyTree | Callable[[PyTree], PyTree],
    *,
    hacbo_state: Any = None,
    groups: str = "submodules",
    submodules: Sequence[str] | None = None,
    seed: int = 0,
    tol: float = 1e-3,
    max_iters: int = 100,
    trace_mode: str = "per_group",
    trace_tol: float = 1e-3,
    trace_max_probes: int = 100,
    hvp_form: str = "restricted",
) -> list[GroupCurvature]:
    """Top eigenvalue, Hutchinson trace, RMS gradient and HACBO's EMA for every group.

    Args:
      loss_fn: params -> scalar loss on the fixed probe set (close over the batch).
      params: the parameter pytree (e.g. an ``nnx.State`` of ``nnx.Param``); compute runs in its
        dtype (float32 by the reference; float64 under x64 for exact checks).
      labels: label tree of ``params`` (or params -> label tree), as for :func:`hacbo_jax.hacbo`.
      hacbo_state: a :class:`~hacbo_jax.HACBOState`, an optimiser state containing one, or a
        curvature array [B, M]; None leaves ``curvature_ema`` NaN. Its raw (never debiased) EMA is
        reported, which ranks groups inside a block as the debiased one does.
      groups: ``"submodules"`` (G = (b, m), default) or ``"blocks"`` (G = b).
      submodules: explicit sub-module order (default: sorted names found in the labels).
      seed: PRNG seed; group G uses ``fold_in(PRNGKey(seed), group_id)`` with group_id = b*M + m
        (b for blocks) for the power iteration and ``fold_in`` of that key with 1 for its probes
        (``trace_mode="shared"``: ``fold_in(PRNGKey(seed), 2**20)``).
      tol, max_iters: power-iteration stop rule (PyHessian: 1e-3, 100).
      trace_mode: ``"per_group"`` (default) or ``"shared"``.
      trace_tol, trace_max_probes: Hutchinson stop rule (PyHessian: 1e-3, 100); ``trace_tol=0``
        always uses ``trace_max_probes`` probes.
      hvp_form: ``"restricted"`` (default, the reference form): hvp_G differentiates f_G, so the
        backward only reaches blocks >= b, but every group is its own compiled program.
        ``"masked"`` (named option): one compiled program for all groups, H_GG v taken as the G
        part of the full HVP of the controlled parameters with v zero outside G; the same
        quantity, one compilation instead of one per group (what a 112-group Qwen3-0.6B probe
        needs), at the price of a full backward per product. Its random draws are masked
        full-size draws, so the numbers differ from ``"restricted"`` within the stop rule.

    Returns:
      One :class:`GroupCurvature` per group, in (block, sub-module) order.
    """
    if groups not in GROUPINGS:
        raise ValueError(f"groups must be one of {GROUPINGS}, got {groups!r}")
    if hvp_form not in HVP_FORMS:
        raise ValueError(f"hvp_form must be one of {HVP_FORMS}, got {hvp_form!r}")
    if trace_mode not in TRACE_MODES:
        raise ValueError(f"trace_mode must be one of {TRACE_MODES}, got {trace_mode!r}")
    _groups.validate_positive_int("max_iters", max_iters)
    _groups.validate_positive_int("trace_max_probes", trace_max_probes)
    for name, value in (("tol", tol), ("trace_tol", trace_tol)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    layout = _groups.resolve_layout(labels, params, submodules)
    leaves = _groups.flatten_like(layout, params, "params")
    group_list = _group_list(layout, leaves, groups)
    num_b, num_m = layout.num_blocks, layout.num_submodules
    curvature = _curvature_from_state(hacbo_state, num_b, num_m)
    base_key = jax.random.PRNGKey(seed)
    controlled = tuple(sorted(i for g in group_list for i in g.leaf_index))

    def loss_of_leaves(all_leaves):
        return loss_fn(layout.treedef.unflatten(all_leaves))

    if hvp_form == "restricted":

        def group_operator(g: _Group):
            """(matvec, like, project): matvec = the group's own compiled HVP."""
            hvp = jax.jit(_restricted_hvp(loss_of_leaves, g.leaf_index))
            like = [leaves[i] for i in g.leaf_index]
            return (lambda v: hvp(leaves, v)), like, (lambda v: v)

    else:
        hvp_all = _restricted_hvp(loss_of_leaves, controlled)

        @jax.jit
        def masked_hvp(all_leaves, mask, v):
            project = lambda x: [m * y for m, y in zip(mask, x)]
            return project(hvp_all(all_leaves, project(v)))

        def group_operator(g: _Group):
            members = set(g.leaf_index)
            mask = [jnp.asarray(i in members, leaves[i].dtype) for i in controlled]
            project = lambda v: [m * x for m, x in zip(mask, v)]
            like = [leaves[i] for i in controlled]
            return (lambda v: masked_hvp(leaves, mask, v)), like, project

    traces: dict[int, tuple[float, float, int]] = {}
    if trace_mode == "shared":
        position = {leaf: k for k, leaf in enumerate(controlled)}
        shared_hvp = jax.jit(_restricted_hvp(loss_of_leaves, controlled))

        @jax.jit
        def split(z, u):
            per_leaf = [jnp.vdot(a, b) for a, b in zip(z, u)]
            return jnp.stack([sum(per_leaf[position[i]] for i in g.leaf_index) for g in group_list])

        samples = hutchinson_samples(
            lambda v: shared_hvp(leaves, v),
            [leaves[i] for i in controlled],
            jax.random.fold_in(base_key, 2**20),
            tol=trace_tol,
            max_probes=trace_max_probes,
            split=split,
        )
        for k, g in enumerate(group_list):
            traces[g.group_id] = (*_mean_se(samples[:, k]), len(samples))

    grads = jax.jit(jax.grad(loss_of_leaves))(leaves)
    rows = []
    for g in group_list:
        key = jax.random.fold_in(base_key, g.group_id)
        matvec, like, project = group_operator(g)
        v0 = project(optax.tree_utils.tree_random_like(key, like, sampler=jax.random.normal))
        lam, iters, converged = power_iteration(matvec, v0, tol=tol, max_iters=max_iters)
        lam_max = lam
        if lam < 0:  # largest algebraic eigenvalue: iterate on H - lam I (our reading)
            lam_max, _, _ = power_iteration(matvec, v0, tol=tol, max_iters=max_iters, shift=lam)
        if trace_mode == "per_group":
            samples = hutchinson_samples(
                lambda z, matvec=matvec, project=project: matvec(project(z)),
                like, jax.random.fold_in(key, 1),
                tol=trace_tol, max_probes=trace_max_probes,
            )  # fmt: skip
            traces[g.group_id] = (*_mean_se(samples), len(samples))
        trace, trace_se, probes = traces[g.group_id]
        size = int(sum(np.size(leaves[i]) for i in g.leaf_index))
        grad_sq = sum(
            float(np.sum(np.square(np.asarray(grads[i], np.float64)))) for i in g.leaf_index
        )
        flags = []
        if float(lam) < 0:
            flags.append("negative")
        if not converged:
            flags.append("not_converged")
        m_index = layout.submodules.index(g.submodule) if groups == "submodules" else None
        rows.append(
            GroupCurvature(
                block=g.block,
                submodule=g.submodule,
                size=size,
                eigenvalue=float(lam),
                eigenvalue_iters=int(iters),
                eigenvalue_max=float(lam_max),
                trace=trace,
                trace_se=trace_se,
                trace_probes=probes,
                trace_per_param=trace / size,
                rms_grad=math.sqrt(grad_sq / size),
                curvature_ema=math.nan if m_index is None else float(curvature[g.block, m_index]),
                flag=";".join(flags),
            )
        )
    return rows


# --------------------------------------------------------------------------------------------
# Rank correlations
# --------------------------------------------------------------------------------------------

PROXIES = ("rms_grad", "curvature_ema")
CURVATURES = ("eigenvalue", "trace_per_param")


@dataclasses.dataclass(frozen=True)
class RankCorrelation:
    """Spearman rho of a proxy against a curvature over one scope, with its permutation p-value.

    Attributes:
      scope: ``"within_blocks"`` (mean of the per-block rho over the M sub-modules of each
        block), ``"pooled"`` (all (b, m)) or ``"across_blocks:{m}"`` (over b for sub-module m).
      proxy, curvature: the :class:`GroupCurvature` fields compared.
      rho: the statistic (NaN when undefined, e.g. a constant input).
      p_value: two-sided permutation p-value (NaN when rho is).
      n: points per correlation (M for within_blocks).
      blocks: blocks with a defined rho (within_blocks), else 1.
      argmax_agreement: within_blocks only: share of those blocks whose largest proxy and largest
        curvature fall on the same sub-module; NaN otherwise.
    """

    scope: str
    proxy: str
    curvature: str
    rho: float
    p_value: float
    n: int
    blocks: int
    argmax_agreement: float


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rho with average ranks for ties (``scipy.stats.spearmanr``); NaN if undefined."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(scipy.stats.spearmanr(x, y).statistic)


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis (NaN where either row is constant)."""
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    denom = np.sqrt(np.sum(a * a, axis=-1) * np.sum(b * b, axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, np.sum(a * b, axis=-1) / np.where(denom > 0, denom, 1.0), np.nan)


def _spearman_permutation(
    x: np.ndarray, y: np.ndarray, n_resamples: int, rng: np.random.Generator
) -> tuple[float, float]:
    """rho and its two-sided p-value from ``scipy.stats.permutation_test`` (x's order permuted;
    exact when n! <= n_resamples)."""
    rho = spearman(x, y)
    if math.isnan(rho):
        return math.nan, math.nan
    rank_y = scipy.stats.rankdata(y)

    def statistic(xs, axis):
        return _row_pearson(scipy.stats.rankdata(xs, axis=axis), rank_y)

    result = scipy.stats.permutation_test(
        (x,),
        statistic,
        permutation_type="pairings",
        vectorized=True,
        n_resamples=n_resamples,
        random_state=rng,
    )
    return rho, float(result.pvalue)


def _within_blocks(
    proxy: np.ndarray, curv: np.ndarray, n_resamples: int, rng: np.random.Generator
) -> tuple[float, float, int, float]:
    """Mean per-block rho over blocks where it is defined, its p-value under shuffles of the
    sub-modules inside every block (our reading of the null), #blocks and argmax agreement."""
    rank_p = scipy.stats.rankdata(proxy, axis=1)
    rank_c = scipy.stats.rankdata(curv, axis=1)
    per_block = _row_pearson(rank_p, rank_c)
    defined = ~np.isnan(per_block)
    if not defined.any():
        return math.nan, math.nan, 0, math.nan
    observed = float(np.mean(per_block[defined]))
    agree = float(np.mean(np.argmax(proxy, 1)[defined] == np.argmax(curv, 1)[defined]))
    shuffled = rng.permuted(np.broadcast_to(rank_p, (n_resamples, *rank_p.shape)), axis=2)
    null = np.mean(_row_pearson(shuffled[:, defined], rank_c[defined]), axis=1)
    # Monte Carlo p-value counting the observed arrangement (as scipy's randomized tests do).
    exceed = np.sum(np.abs(null) >= abs(observed) - 1e-12)
    return observed, float((exceed + 1) / (n_resamples + 1)), int(defined.sum()), agree


def rank_correlations(
    rows: Sequence[GroupCurvature],
    *,
    proxies: Sequence[str] = PROXIES,
    curvatures: Sequence[str] = CURVATURES,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> list[RankCorrelation]:
    """Spearman rho of each proxy against each curvature: (i) inside blocks, (ii) pooled over all
    (b, m), (iii) across blocks per sub-module type, each with a permutation p-value.

    (i) is HACBO's use (v_{b,m} ~ 1/c_{b,m} inside a block): rho_b over the M sub-modules of block
    b (on 4 points rho takes 11 values), averaged over blocks, with the share of blocks whose
    argmax agrees; its null shuffles the sub-modules inside every block independently
    (``n_resamples`` Monte Carlo shuffles, p = (#{|null| >= |obs|} + 1) / (n_resamples + 1)).
    (ii) and (iii) use ``scipy.stats.permutation_test`` (``permutation_type="pairings"``).
    A proxy whose column is all NaN (no HACBO state) is skipped. Needs ``groups="submodules"``.
    """
    _groups.validate_positive_int("n_resamples", n_resamples)
    if not rows:
        raise ValueError("rows is empty: nothing to correlate")
    if any(r.submodule == "*" for r in rows):
        raise ValueError("rank_correlations needs groups='submodules' rows (got groups='blocks')")
    fields = {f.name for f in dataclasses.fields(GroupCurvature)}
    for name in (*proxies, *curvatures):
        if name not in fields:
            raise ValueError(f"{name!r} is not a GroupCurvature field; fields: {sorted(fields)}")
    blocks = sorted({r.block for r in rows})
    subs = list(dict.fromkeys(r.submodule for r in rows))
    index = {(r.block, r.submodule): r for r in rows}
    if len(index) != len(blocks) * len(subs):
        raise ValueError("every block needs a row for every sub-module")

    def matrix(name: str) -> np.ndarray:
        return np.array(
            [[getattr(index[b, m], name) for m in subs] for b in blocks], dtype=np.float64
        )

    rng = np.random.default_rng(seed)
    out = []
    for proxy_name in proxies:
        proxy = matrix(proxy_name)
        if np.all(np.isnan(proxy)):
            continue
        for curv_name in curvatures:
            curv = matrix(curv_name)
            rho, p, count, agree = _within_blocks(proxy, curv, n_resamples, rng)
            out.append(
                RankCorrelation(
                    "within_blocks", proxy_name, curv_name, rho, p, len(subs), count, agree
                )
            )
            rho, p = _spearman_permutation(proxy.ravel(), curv.ravel(), n_resamples, rng)
            out.append(
                RankCorrelation("pooled", proxy_name, curv_name, rho, p, proxy.size, 1, math.nan)
            )
            for k, m in enumerate(subs):
                rho, p = _spearman_permutation(proxy[:, k], curv[:, k], n_resamples, rng)
                out.append(
                    RankCorrelation(
                        f"across_blocks:{m}",
                        proxy_name,
                        curv_name,
                        rho,
                        p,
                        len(blocks),
                        1,
                        math.nan,
                    )
                )
    return out


def bootstrap_rank_ci(
    per_batch: Sequence[Sequence[GroupCurvature]],
    *,
    proxy: str = "rms_grad",
    curvature: str = "eigenvalue",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs over probe batches for the within-block mean rho and the pooled
    rho (reference step 3: "bootstrap over probe batches for CIs").

    ``per_batch`` holds one probe table per probe batch (same groups in the same order). Each
    replicate draws batches with replacement, averages every group's ``proxy`` and ``curvature``
    over the drawn batches and recomputes the two statistics (our reading). Replicates where a
    statistic is undefined are dropped. Returns {"within_blocks": (lo, hi), "pooled": (lo, hi)}.
    """
    _groups.validate_positive_int("n_boot", n_boot)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if len(per_batch) < 2:
        raise ValueError(f"a bootstrap over batches needs >= 2 probe tables, got {len(per_batch)}")
    keys = [(r.block, r.submodule) for r in per_batch[0]]
    if any([(r.block, r.submodule) for r in table] != keys for table in per_batch):
        raise ValueError("every probe table must list the same groups in the same order")
    blocks = sorted({b for b, _ in keys})
    subs = list(dict.fromkeys(m for _, m in keys))
    position = {k: i for i, k in enumerate(keys)}
    order = [position[b, m] for b in blocks for m in subs]
    values = {
        name: np.array([[getattr(r, name) for r in table] for table in per_batch])[:, order]
        for name in (proxy, curvature)
    }
    rng = np.random.default_rng(seed)
    within, pooled = [], []
    for _ in range(n_boot):
        draw = rng.integers(0, len(per_batch), len(per_batch))
        p = values[proxy][draw].mean(axis=0).reshape(len(blocks), len(subs))
        c = values[curvature][draw].mean(axis=0).reshape(len(blocks), len(subs))
        per_block = _row_pearson(scipy.stats.rankdata(p, axis=1), scipy.stats.rankdata(c, axis=1))
        if not np.all(np.isnan(per_block)):
            within.append(np.nanmean(per_block))
        rho = spearman(p.ravel(), c.ravel())
        if not math.isnan(rho):
            pooled.append(rho)
    tail = 100 * (1 - level) / 2

    def interval(samples):
        if not samples:
            return (math.nan, math.nan)
        lo, hi = np.percentile(samples, [tail, 100 - tail])
        return (float(lo), float(hi))

    return {"within_blocks": interval(within), "pooled": interval(pooled)}


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def write_outputs(
    rows: Sequence[GroupCurvature],
    correlations: Sequence[RankCorrelation],
    directory: str | Path,
    *,
    prefix: str = "curvature",
    metadata: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Writes ``{prefix}.csv`` (one row per group), ``{prefix}.json`` (rows, correlations,
    metadata) and ``{prefix}.png`` (:func:`plot_probe`) under ``directory``; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {k: directory / f"{prefix}.{k}" for k in ("csv", "json", "png")}
    names = [f.name for f in dataclasses.fields(GroupCurvature)]
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)

    def finite(x):
        return x if not (isinstance(x, float) and not math.isfinite(x)) else None

    document = {
        "metadata": metadata or {},
        "groups": [{k: finite(v) for k, v in dataclasses.asdict(r).items()} for r in rows],
        "correlations": [
            {k: finite(v) for k, v in dataclasses.asdict(c).items()} for c in correlations
        ],
    }
    paths["json"].write_text(json.dumps(document, indent=2) + "\n")
    plot_probe(rows, correlations, paths["png"])
    return paths


def plot_probe(
    rows: Sequence[GroupCurvature],
    correlations: Sequence[RankCorrelation],
    path: str | Path,
    *,
    title: str = "HVP curvature probe",
) -> None:
    """Figure: proxy (RMS gradient, and HACBO's EMA if present) against lambda_G and T_G/n_G,
    log-log, one colour per sub-module, within-block rho in each panel's title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    proxies = [p for p in PROXIES if not all(math.isnan(getattr(r, p)) for r in rows)]
    fig, axes = plt.subplots(
        len(proxies),
        len(CURVATURES),
        figsize=(5 * len(CURVATURES), 4 * len(proxies)),
        squeeze=False,
    )
    subs = list(dict.fromkeys(r.submodule for r in rows))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rho = {(c.proxy, c.curvature): c for c in correlations if c.scope == "within_blocks"}
    for i, proxy in enumerate(proxies):
        for j, curv in enumerate(CURVATURES):
            ax = axes[i][j]
            for k, m in enumerate(subs):
                points = [(getattr(r, proxy), getattr(r, curv)) for r in rows if r.submodule == m]
                x, y = np.array(points, dtype=np.float64).T
                ax.scatter(x, np.abs(y), s=18, color=colours[k % len(colours)], label=m)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(proxy)
            ax.set_ylabel(f"|{curv}|")
            stat = rho.get((proxy, curv))
            if stat is not None:
                ax.set_title(
                    f"within-block rho {stat.rho:+.2f} (p {stat.p_value:.3g}), "
                    f"argmax {stat.argmax_agreement:.0%}",
                    fontsize=9,
                )
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
