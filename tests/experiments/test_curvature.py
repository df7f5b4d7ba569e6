"""HVP curvature probe: the hand cases of docs/algorithm.md (curvature probe).

Quadratic losses L = 1/2 theta^T A theta over a tiny labelled tree have a known Hessian A, so
every eigenvalue and trace is checked against numpy; the tiny MLP checks the HVP itself against
``jax.hessian`` and central differences in float64.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from hacbo_jax import HACBOState
from hacbo_jax.experiments.curvature.probe import (
    GroupCurvature,
    _curvature_from_state,
    group_hvp,
    probe_curvature,
    rank_correlations,
    spearman,
    write_outputs,
)

# Two blocks, sub-modules "a" (2 coordinates) and "b" (3), one uncontrolled leaf "emb" (2).
# jax flattens dict keys sorted: blocks[0].a, blocks[0].b, blocks[1].a, blocks[1].b, emb.
SIZES = [2, 3, 2, 3, 2]
LABELS = {"blocks": [{"a": "0/a", "b": "0/b"}, {"a": "1/a", "b": "1/b"}], "emb": "other"}
GROUP_SLICES = {(0, "a"): slice(0, 2), (0, "b"): slice(2, 5), (1, "a"): slice(5, 7),
                (1, "b"): slice(7, 10)}  # fmt: skip


def params_from_vector(theta):
    parts = np.split(np.asarray(theta), np.cumsum(SIZES)[:-1])
    return {
        "blocks": [{"a": jnp.asarray(parts[0]), "b": jnp.asarray(parts[1])},
                   {"a": jnp.asarray(parts[2]), "b": jnp.asarray(parts[3])}],
        "emb": jnp.asarray(parts[4]),
    }  # fmt: skip


def vector(params):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(params)])


def quadratic_loss(a_matrix):
    a_matrix = jnp.asarray(a_matrix)
    return lambda params: 0.5 * vector(params) @ a_matrix @ vector(params)


def coupled_spd(seed=0, n=12):
    """A random SPD matrix coupling every coordinate with every other one."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return q @ np.diag(np.linspace(1.0, 10.0, n)) @ q.T


def gapped_spd(seed=0):
    """SPD, coupled across groups, each A_GG with a clear top eigen-gap (ratio <= 1/2), so the
    stop rule on the change also bounds the error."""
    rng = np.random.default_rng(seed)
    coupling = rng.normal(size=(12, 12)) * 0.05
    a = coupling + coupling.T
    for cut in GROUP_SLICES.values():
        n = cut.stop - cut.start
        q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        a[cut, cut] = q @ np.diag([1.0, 4.0] if n == 2 else [1.0, 2.0, 6.0]) @ q.T
    a[10:, 10:] = np.eye(2)
    assert np.linalg.eigvalsh(a)[0] > 0
    return a


def by_group(rows):
    return {(r.block, r.submodule): r for r in rows}


@pytest.mark.parametrize("hvp_form", [pytest.param("restricted", marks=pytest.mark.slow), "masked"])
def test_quadratic_top_eigenvalue_default_tol_and_tight_tol(hvp_form):
    a = gapped_spd()
    with jax.enable_x64(True):
        params = params_from_vector(np.ones(12))
        options = {"trace_max_probes": 2, "hvp_form": hvp_form}
        loose = by_group(probe_curvature(quadratic_loss(a), params, LABELS, **options))
        tight = by_group(probe_curvature(quadratic_loss(a), params, LABELS, tol=1e-9, **options))
    for group, cut in GROUP_SLICES.items():
        expected = np.linalg.eigvalsh(a[cut, cut])[-1]
        assert loose[group].eigenvalue == pytest.approx(expected, rel=1e-3)
        assert tight[group].eigenvalue == pytest.approx(expected, rel=1e-6)
        assert loose[group].eigenvalue_max == loose[group].eigenvalue
        assert loose[group].flag == ""
        assert loose[group].size == cut.stop - cut.start
    assert set(loose) == set(GROUP_SLICES)  # "emb" is not a group


def test_diagonal_group_blocks_give_the_exact_trace_from_every_probe():
    # Diagonal A_GG, but coupled across groups: z^T A_GG z = tr(A_GG) for every Rademacher z, so
    # the running mean stops after the second probe (the first is compared with 0) with SE 0.
    a = coupled_spd(1) * 0.1
    for cut in GROUP_SLICES.values():
        a[cut, cut] = np.diag(np.arange(1.0, 1.0 + cut.stop - cut.start) * (cut.start + 1))
    a = a + a.T - np.diag(np.diag(a))  # keep it symmetric
    with jax.enable_x64(True):
        rows = by_group(
            probe_curvature(quadratic_loss(a), params_from_vector(np.zeros(12)), LABELS)
        )
    for group, cut in GROUP_SLICES.items():
        row = rows[group]
        assert row.trace == pytest.approx(np.trace(a[cut, cut]), rel=1e-12)
        assert row.trace_se == 0.0
        assert row.trace_probes == 2
        assert row.trace_per_param == pytest.approx(row.trace / row.size)


def test_negative_top_eigenvalue_is_reported_flagged_and_shift_gives_largest():
    # Group (0, b) has eigenvalues {-5, 1, 2}; everything else is small and positive.
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    a = 0.01 * np.eye(12)
    a[2:5, 2:5] = q @ np.diag([-5.0, 1.0, 2.0]) @ q.T
    with jax.enable_x64(True):
        rows = by_group(
            probe_curvature(
                quadratic_loss(a), params_from_vector(np.zeros(12)), LABELS, tol=1e-10,
                max_iters=500, trace_max_probes=2, hvp_form="masked",
            )
        )  # fmt: skip
    row = rows[(0, "b")]
    assert row.eigenvalue == pytest.approx(-5.0, rel=1e-6)
    assert "negative" in row.flag
    assert row.eigenvalue_max == pytest.approx(2.0, rel=1e-6)
    assert rows[(0, "a")].flag == "" and rows[(0, "a")].eigenvalue == pytest.approx(0.01)


def test_power_iteration_limit_is_flagged():
    a = coupled_spd()
    with jax.enable_x64(True):
        rows = probe_curvature(
            quadratic_loss(a), params_from_vector(np.ones(12)), LABELS, tol=0.0, max_iters=3,
            trace_max_probes=2, hvp_form="masked",
        )  # fmt: skip
    assert all(r.eigenvalue_iters == 3 and r.flag == "not_converged" for r in rows)


def test_shared_probes_are_unbiased():
    a = coupled_spd(2)
    with jax.enable_x64(True):
        rows = by_group(
            probe_curvature(
                quadratic_loss(a), params_from_vector(np.zeros(12)), LABELS,
                trace_mode="shared", trace_tol=0.0, trace_max_probes=2000, hvp_form="masked",
            )
        )  # fmt: skip
    for group, cut in GROUP_SLICES.items():
        row = rows[group]
        assert row.trace_probes == 2000
        assert row.trace_se > 0
        assert abs(row.trace - np.trace(a[cut, cut])) < 3 * row.trace_se


def mlp_params(key):
    k = jax.random.split(key, 5)
    return {
        "blocks": [
            {"w": jax.random.normal(k[0], (3, 4)), "b": jax.random.normal(k[1], (4,))},
            {"w": jax.random.normal(k[2], (4, 2)), "b": jax.random.normal(k[3], (2,))},
        ],
        "head": jax.random.normal(k[4], (2,)),
    }


MLP_LABELS = {"blocks": [{"w": "0/w", "b": "0/b"}, {"w": "1/w", "b": "1/b"}], "head": "other"}


def mlp_loss(params):
    x = jnp.linspace(-1.0, 1.0, 15).reshape(5, 3)
    h = jnp.tanh(x @ params["blocks"][0]["w"] + params["blocks"][0]["b"])
    h = jnp.tanh(h @ params["blocks"][1]["w"] + params["blocks"][1]["b"])
    return jnp.mean(jnp.square(h @ params["head"] - 0.3))


@pytest.mark.slow
@pytest.mark.parametrize("block,submodule", [(0, "w"), (1, "b"), (0, None)])
def test_mlp_hvp_matches_jax_hessian_and_central_differences(block, submodule):
    with jax.enable_x64(True):
        params = jax.tree.map(lambda x: x.astype(jnp.float64), mlp_params(jax.random.PRNGKey(0)))
        names = ["b", "w"] if submodule is None else [submodule]  # flatten order: b before w
        sub = [params["blocks"][block][n] for n in names]

        def f(leaves):
            inner = dict(params["blocks"][block], **dict(zip(names, leaves)))
            blocks = list(params["blocks"])
            blocks[block] = inner
            return mlp_loss({"blocks": blocks, "head": params["head"]})

        v = [jax.random.normal(jax.random.PRNGKey(7 + i), x.shape, jnp.float64)
             for i, x in enumerate(sub)]  # fmt: skip
        got = group_hvp(mlp_loss, params, MLP_LABELS, block, submodule)(v)

        flat = lambda leaves: jnp.concatenate([jnp.ravel(x) for x in leaves])
        sizes = np.cumsum([x.size for x in sub])[:-1]
        unflat = lambda vec: [y.reshape(x.shape) for x, y in zip(sub, jnp.split(vec, sizes))]
        hessian = jax.hessian(lambda vec: f(unflat(vec)))(flat(sub))
        expected = hessian @ flat(v)
        np.testing.assert_allclose(flat(got), expected, rtol=1e-6, atol=1e-9)

        eps = 1e-4
        grad = lambda leaves: flat(jax.grad(f)(leaves))
        plus = grad([x + eps * d for x, d in zip(sub, v)])
        minus = grad([x - eps * d for x, d in zip(sub, v)])
        np.testing.assert_allclose(flat(got), (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-9)


@pytest.mark.slow  # ~40 s on the loaded CPU: one compiled program per group (the reference form)
def test_mlp_probe_rows_match_the_hessian_blocks_in_float64():
    with jax.enable_x64(True):
        params = jax.tree.map(lambda x: x.astype(jnp.float64), mlp_params(jax.random.PRNGKey(1)))
        rows = by_group(probe_curvature(mlp_loss, params, MLP_LABELS, tol=1e-12, max_iters=1000))
        grads = jax.grad(mlp_loss)(params)
        for (block, sub), row in rows.items():
            x = params["blocks"][block][sub]

            def loss_of(y, block=block, sub=sub, shape=x.shape):
                blocks = [dict(blk) for blk in params["blocks"]]
                blocks[block][sub] = y.reshape(shape)
                return mlp_loss({"blocks": blocks, "head": params["head"]})

            h = jax.hessian(loss_of)(jnp.ravel(x))
            eig = np.linalg.eigvalsh(np.asarray(h))
            top = eig[np.argmax(np.abs(eig))]
            assert row.eigenvalue == pytest.approx(top, rel=1e-6)
            assert row.eigenvalue_max == pytest.approx(eig[-1], rel=1e-6, abs=1e-12)
            g = np.asarray(grads["blocks"][block][sub])
            assert row.rms_grad == pytest.approx(np.linalg.norm(g) / math.sqrt(g.size), rel=1e-12)
            assert math.isnan(row.curvature_ema)


def test_curvature_ema_comes_from_the_hacbo_state():
    curvature = jnp.asarray([[0.1, 0.2], [0.3, 0.4]], jnp.float32)
    state = HACBOState(
        count=jnp.int32(0), agreement=jnp.zeros(2), curvature=curvature,
        neg_count=jnp.zeros(2, jnp.int32), probation=jnp.zeros(2, bool),
        layer_weights=jnp.full(2, 0.5), cosine=jnp.zeros(2),
    )  # fmt: skip
    params = params_from_vector(np.ones(12, np.float32))
    loss = quadratic_loss(np.eye(12, dtype=np.float32))
    rows = by_group(probe_curvature(loss, params, LABELS, hacbo_state=state, hvp_form="masked"))
    assert rows[(1, "a")].curvature_ema == pytest.approx(0.3)
    assert rows[(0, "b")].curvature_ema == pytest.approx(0.2)
    for given in ((None, state), curvature):  # inside an optimiser state, or the array itself
        np.testing.assert_allclose(_curvature_from_state(given, 2, 2), curvature, rtol=1e-7)
    with pytest.raises(ValueError, match="shape"):
        _curvature_from_state(jnp.zeros((3, 2)), 2, 2)
    with pytest.raises(ValueError, match="HACBOState"):
        _curvature_from_state({"x": jnp.zeros(2)}, 2, 2)


def test_blocks_grouping_and_argument_checks():
    a = coupled_spd()
    with jax.enable_x64(True):
        rows = probe_curvature(
            quadratic_loss(a), params_from_vector(np.ones(12)), LABELS, groups="blocks",
            tol=1e-10, max_iters=500, trace_max_probes=2, hvp_form="masked",
        )  # fmt: skip
    assert [(r.block, r.submodule, r.size) for r in rows] == [(0, "*", 5), (1, "*", 5)]
    assert rows[1].eigenvalue == pytest.approx(np.linalg.eigvalsh(a[5:10, 5:10])[-1], rel=1e-6)
    params = params_from_vector(np.ones(12, np.float32))
    loss = quadratic_loss(np.eye(12, dtype=np.float32))
    for kwargs, match in [
        ({"groups": "layers"}, "groups must be one of"),
        ({"trace_mode": "exact"}, "trace_mode must be one of"),
        ({"max_iters": 0}, "max_iters must be an integer >= 1"),
        ({"tol": -1.0}, "tol must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            probe_curvature(loss, params, LABELS, **kwargs)


def test_spearman_hand_cases_and_ties_equal_scipy():
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    x, y = [1.0, 2.0, 2.0, 3.0, 5.0], [2.0, 1.0, 4.0, 4.0, 3.0]
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-15)
    # Average ranks: x -> [1, 2.5, 2.5, 4, 5], y -> [2, 1, 4.5, 4.5, 3]; Pearson of the ranks.
    rx, ry = np.array([1, 2.5, 2.5, 4, 5]), np.array([2, 1, 4.5, 4.5, 3])
    assert spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def row(block, submodule, proxy, curvature):
    return GroupCurvature(
        block, submodule, 4, curvature, 3, curvature, 4.0 * curvature, 0.0, 2, curvature, proxy,
        math.nan, "",
    )  # fmt: skip


def test_rank_correlations_by_hand():
    # Block 0: proxy ranks = curvature ranks (rho 1, argmax agrees). Block 1: reversed (rho -1,
    # argmax disagrees). Mean rho 0; pooled over 8 points and across blocks computed by scipy.
    proxies = {0: [1.0, 2.0, 3.0, 4.0], 1: [4.0, 3.0, 2.0, 1.0]}
    curvs = {0: [0.1, 0.2, 0.3, 0.4], 1: [1.0, 2.0, 3.0, 4.0]}
    subs = ["attn_out", "attn_qkv", "ln", "mlp"]
    rows = [row(b, m, proxies[b][k], curvs[b][k]) for b in (0, 1) for k, m in enumerate(subs)]
    out = {(c.scope, c.curvature): c for c in rank_correlations(rows, n_resamples=2000)}
    within = out[("within_blocks", "eigenvalue")]
    assert within.rho == pytest.approx(0.0) and within.blocks == 2 and within.n == 4
    assert within.argmax_agreement == pytest.approx(0.5)
    assert within.p_value > 0.5  # 0 is the centre of the null
    pooled = out[("pooled", "eigenvalue")]
    flat_p = proxies[0] + proxies[1]
    flat_c = curvs[0] + curvs[1]
    assert pooled.rho == pytest.approx(scipy.stats.spearmanr(flat_p, flat_c).statistic)
    assert pooled.n == 8
    # Across blocks on 2 points: attn_out has proxy (1, 4), curvature (0.1, 1) -> rho = 1; mlp
    # has proxy (4, 1), curvature (0.4, 4) -> rho = -1; the exact test on 2 points gives p = 1.
    across = out[("across_blocks:attn_out", "eigenvalue")]
    assert across.rho == pytest.approx(1.0) and across.p_value == pytest.approx(1.0)
    assert out[("across_blocks:mlp", "eigenvalue")].rho == pytest.approx(-1.0)
    assert all(c.proxy == "rms_grad" for c in out.values())  # curvature_ema is all NaN: skipped


def test_within_block_perfect_ranking_p_value():
    # Every block ranks its 4 sub-modules identically under proxy and curvature: rho = 1 in each
    # of 6 blocks; under the within-block shuffle P(mean rho = 1) = (1/24)^6, so p = 1/(n + 1).
    subs = ["a", "b", "c", "d"]
    rng = np.random.default_rng(0)
    rows = []
    for b in range(6):
        values = rng.permutation(4) + 4.0 * b  # no ties across blocks either
        rows += [row(b, m, values[k], 10.0 * values[k]) for k, m in enumerate(subs)]
    stats = rank_correlations(rows, curvatures=("eigenvalue",), n_resamples=999)
    within = next(c for c in stats if c.scope == "within_blocks")
    assert within.rho == pytest.approx(1.0) and within.argmax_agreement == 1.0
    assert within.p_value == pytest.approx(1 / 1000)
    across = next(c for c in stats if c.scope == "across_blocks:a")
    assert across.rho == pytest.approx(1.0) and across.n == 6
    # Exact permutation test on 6 points: 2 of 720 orderings reach |rho| = 1.
    assert across.p_value == pytest.approx(2 / 720)


def test_write_outputs(tmp_path):
    subs = ["a", "b"]
    rows = [row(b, m, 1.0 + b + k, 2.0 + k * b) for b in range(3) for k, m in enumerate(subs)]
    stats = rank_correlations(rows, n_resamples=100)
    paths = write_outputs(rows, stats, tmp_path, metadata={"checkpoint": "x"})
    import csv
    import json

    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and table[0]["submodule"] == "a" and table[0]["curvature_ema"] == "nan"
    document = json.loads(paths["json"].read_text())
    assert document["metadata"] == {"checkpoint": "x"}
    assert document["groups"][0]["curvature_ema"] is None
    assert paths["png"].stat().st_size > 0


# ---- the entry script (hacbo_jax/experiments/curvature/run.py): input errors exit 2, no traceback ----


def test_probe_script_bad_inputs_exit_2(tmp_path, capsys):
    from hacbo_jax.experiments.curvature import run as script

    assert script.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "no config.json" in err and "Traceback" not in err
    (tmp_path / "config.json").write_text("{}")
    args = [str(tmp_path), "--out", str(tmp_path / "o"), "--hacbo-state", str(tmp_path / "c.txt")]
    assert script.main(args) == 2
    assert "neither a file nor a checkpoint directory" in capsys.readouterr().err
    assert script.main([str(tmp_path), "--out", str(tmp_path / "o"), "--rows", "0"]) == 2
    assert "--rows must be >= 1" in capsys.readouterr().err


def test_probe_script_reads_the_curvature_ema(tmp_path):
    import json

    from hacbo_jax.experiments.curvature.run import load_curvature

    c = np.arange(8.0).reshape(4, 2)
    (tmp_path / "c.json").write_text(json.dumps({"curvature": c.tolist()}))
    np.save(tmp_path / "c.npy", c)
    np.savez(tmp_path / "c.npz", curvature=c)
    for name in ("c.json", "c.npy", "c.npz"):
        np.testing.assert_array_equal(load_curvature(str(tmp_path / name)), c)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="no top-level 'curvature'"):
        load_curvature(str(tmp_path / "bad.json"))


def test_bootstrap_over_probe_batches():
    from hacbo_jax.experiments.curvature.probe import bootstrap_rank_ci

    subs = ["a", "b", "c", "d"]
    # Identical batches: every replicate is the same table, so the CI collapses onto rho.
    table = [
        row(b, m, 1.0 + k + b, 2.0 * (1 + k) + b) for b in range(3) for k, m in enumerate(subs)
    ]
    ci = bootstrap_rank_ci([table, table, table], n_boot=50)
    assert ci["within_blocks"] == pytest.approx((1.0, 1.0))
    assert ci["pooled"][0] == ci["pooled"][1] == pytest.approx(spearman(
        [r.rms_grad for r in table], [r.eigenvalue for r in table]))  # fmt: skip
    # Two batches with opposite within-block rankings: replicates give -1, 1 or the mean table.
    flipped = [row(b, m, 4.0 - k, 2.0 * (1 + k) + b) for b in range(3) for k, m in enumerate(subs)]
    lo, hi = bootstrap_rank_ci([table, flipped], n_boot=400)["within_blocks"]
    assert lo == pytest.approx(-1.0) and hi == pytest.approx(1.0)
    with pytest.raises(ValueError, match=">= 2 probe tables"):
        bootstrap_rank_ci([table])


@pytest.mark.slow  # compiles the HVP of a (tiny) Qwen3
def test_probe_script_end_to_end_on_a_tiny_qwen3(tmp_path, capsys):
    import json

    from support.checkpoints import make_tiny_checkpoint
    from hacbo_jax.experiments.curvature import run as script

    model_dir = make_tiny_checkpoint(tmp_path / "model", hidden=16)
    np.save(tmp_path / "c.npy", np.arange(8.0).reshape(2, 4) + 1.0)
    out = tmp_path / "out"
    argv = [str(model_dir), "--out", str(out), "--rows", "2", "--seq-len", "32",
            "--max-iters", "3", "--trace-max-probes", "2", "--n-resamples", "50",
            "--hvp-form", "masked", "--hacbo-state", str(tmp_path / "c.npy")]  # fmt: skip
    assert script.main(argv) == 0
    assert "within_blocks" in capsys.readouterr().out
    document = json.loads((out / "curvature.json").read_text())
    groups = [(g["block"], g["submodule"]) for g in document["groups"]]
    assert groups == [(b, m) for b in range(2) for m in ("attn_qkv", "attn_out", "mlp", "ln")]
    assert document["groups"][5]["curvature_ema"] == 6.0  # c[1, 1]
    assert all(g["eigenvalue_iters"] <= 3 and g["trace_probes"] <= 2 for g in document["groups"])
    assert (out / "curvature.png").stat().st_size > 0
