"""lr x wd sweep: the hand cases of docs/algorithm.md (lr·wd sweep)."""

import json
import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hacbo_jax.experiments.lrwd.sweep import (
    VERDICT_FAILS,
    VERDICT_HOLDS,
    analyse,
    check_t_gamma,
    grid_runs,
    mean_spread,
    run_sweep,
    salient_angle,
    smooth,
    spread_over_time,
    verdict,
    write_results,
)

ANCHOR = (2.0**-10, 0.1)


def test_family_construction():
    runs = grid_runs(ANCHOR)
    assert len(runs) == 15  # 13 distinct family runs + 2 noise seeds
    gamma = [r for r in runs if "gamma" in r.families]
    assert len(gamma) == 5
    for r in gamma:
        assert r.i + r.j == 0
        assert r.gamma == pytest.approx(ANCHOR[0] * ANCHOR[1], rel=1e-15)
    eta = [r for r in runs if "eta" in r.families]
    assert len(eta) == 5 and all(r.i == 0 and r.lr == ANCHOR[0] for r in eta)
    assert len({r.gamma for r in eta}) == 5
    assert max(r.gamma for r in eta) / min(r.gamma for r in eta) == pytest.approx(16.0)
    lam = [r for r in runs if "lambda" in r.families]
    assert len(lam) == 5 and all(r.j == 0 and r.wd == ANCHOR[1] for r in lam)
    noise = [r for r in runs if "noise" in r.families]
    assert [(r.i, r.j, r.seed) for r in noise] == [(0, 0, 0), (0, 0, 1), (0, 0, 2)]
    anchor = next(r for r in runs if (r.i, r.j, r.seed) == (0, 0, 0))
    assert set(anchor.families) == {"gamma", "eta", "lambda", "noise"}
    assert next(r for r in runs if (r.i, r.j) == (2, -2)).lr == pytest.approx(2.0**-8)
    full = grid_runs(ANCHOR, full=True)
    assert len({(r.i, r.j) for r in full if r.seed == 0}) == 25 and len(full) == 27
    with pytest.raises(ValueError, match="unknown families"):
        grid_runs(ANCHOR, families=("wd",))
    with pytest.raises(ValueError, match="anchor"):
        grid_runs((0.0, 0.1))


def test_one_adamw_step_with_zero_gradient_is_a_pure_shrink():
    # The optax fact the sweep rests on: the decay is scaled by the LR, theta <- theta (1 - eta lam).
    eta, lam = 0.01, 0.3
    theta = jnp.asarray([1.0, -2.0, 0.5])
    tx = optax.adamw(eta, weight_decay=lam)
    updates, _ = tx.update(jnp.zeros(3), tx.init(theta), theta)
    np.testing.assert_allclose(
        optax.apply_updates(theta, updates), theta * (1 - eta * lam), rtol=1e-6
    )


def curve(values, steps=None):
    steps = range(len(values)) if steps is None else steps
    return [{"step": s, "train_loss": float(v)} for s, v in zip(steps, values)]


def test_spread_on_shifted_and_identical_curves():
    t = np.arange(100)
    f = np.exp(-t / 30.0) + 0.1 * np.sin(t)
    deltas = [0.0, 0.3, -0.2, 0.05]
    curves = [curve(f + d) for d in deltas]
    steps, spread = spread_over_time(curves)
    assert steps[0] == 10 and steps[-1] == 99  # t in [0.1 T, T], T = 99 -> from 9.9
    np.testing.assert_allclose(spread, max(deltas) - min(deltas), rtol=1e-12)
    assert mean_spread(curves) == pytest.approx(0.5)
    assert mean_spread([curve(f), curve(f)]) == 0.0
    with pytest.raises(ValueError, match="other steps"):
        spread_over_time([curve(f), curve(f, steps=t + 1)])


def test_smoothing_is_a_centred_mean_shrinking_at_the_ends():
    np.testing.assert_allclose(smooth([0.0, 10.0, 20.0, 30.0, 40.0, 50.0]),
                               [10.0, 15.0, 20.0, 30.0, 35.0, 40.0])  # fmt: skip
    with pytest.raises(ValueError, match="odd"):
        smooth([1.0, 2.0], window=4)


def test_verdict_thresholds():
    assert verdict(0.1, 0.5, 0.06) == VERDICT_HOLDS
    assert verdict(0.13, 0.5, 0.06) == VERDICT_FAILS  # above 2 S_0
    assert verdict(0.1, 0.09, 0.06) == VERDICT_FAILS  # not below S_eta
    assert verdict(0.13, 0.5, 0.06, noise_factor=3.0) == VERDICT_HOLDS


@pytest.mark.parametrize("loss,angle", [
    (lambda x, y: (x + y - 1.5) ** 2, 0.0),  # depends on log gamma only
    (lambda x, y: (x - 0.7) ** 2, 45.0),  # depends on eta only
    (lambda x, y: (x - y) ** 2, 90.0),
])  # fmt: skip
def test_salient_angle_on_quadratics(loss, angle):
    grid = [(x, y) for x in range(-2, 3) for y in range(-2, 3)]
    x, y = np.array(grid, np.float64).T
    assert salient_angle(x, y, loss(x, y)) == pytest.approx(angle, abs=1e-6)


def test_t_gamma_warning():
    with pytest.warns(UserWarning, match="expect eta-invariance only"):
        assert check_t_gamma(351, 6.42e-5, 0.1) == pytest.approx(351 * 6.42e-6)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_t_gamma(3000, 1e-2, 0.1) == pytest.approx(3.0)


def toy_train(lr, wd, seed, steps=60):
    """A loss that depends on gamma = lr * wd only, plus seed noise: gamma-invariance holds."""
    rng = np.random.default_rng(seed)
    t = np.arange(0, steps + 1, 2)
    loss = np.exp(-t * lr * wd * 50) + 0.01 * rng.normal(size=t.size)
    return [{"step": int(s), "train_loss": float(v), "val_loss": float(v)} for s, v in zip(t, loss)]


def test_run_sweep_end_to_end(tmp_path, capsys):
    anchor = (0.1, 0.2)
    result = run_sweep(toy_train, anchor=anchor, total_steps=60, full=True, log_dir=tmp_path / "l")
    assert len(result.runs) == 27
    assert result.t_gamma == pytest.approx(60 * 0.02)
    assert "T x gamma = 60" in capsys.readouterr().out
    assert result.verdict == VERDICT_HOLDS
    assert result.spreads["gamma"] < result.spreads["eta"]
    assert result.ratios["gamma"] == pytest.approx(
        result.spreads["gamma"] / result.spreads["noise"]
    )
    assert result.angle is not None and result.angle < 10.0
    logged = (tmp_path / "l" / "i+0_j+0_s0.jsonl").read_text().splitlines()
    assert json.loads(logged[0])["gamma"] == pytest.approx(0.02)
    paths = write_results(result, tmp_path / "out")
    summary = json.loads(paths["json"].read_text())
    assert summary["verdict"] == VERDICT_HOLDS and paths["png"].stat().st_size > 0
    assert len(paths["csv"].read_text().splitlines()) == 28


def test_analyse_without_full_grid_has_no_angle():
    runs = grid_runs((0.1, 0.2))
    curves = {r.name: toy_train(r.lr, r.wd, r.seed) for r in runs}
    result = analyse(runs, curves, anchor=(0.1, 0.2))
    assert result.angle is None and set(result.spreads) == {"gamma", "eta", "lambda", "noise"}
    assert not math.isnan(result.ratios["eta"])


def test_sweep_script_bad_inputs_exit_2(tmp_path, capsys):
    from hacbo_jax.experiments.lrwd import run as script

    assert script.main(["--out", str(tmp_path), "--steps", "20", "--log-every", "5"]) == 2
    err = capsys.readouterr().err
    assert "at least 5 logged points" in err and "Traceback" not in err
    assert script.main(["--out", str(tmp_path), "--tokenizer", str(tmp_path)]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err
    assert script.main(["--out", str(tmp_path), "--wd", "0"]) == 2
    assert "--lr and --wd must be > 0" in capsys.readouterr().err
