"""train.logs (JSON lines, resume truncation, optional mirrors) and hacbo_jax.experiments.report (figures, table)."""

import json
import math
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from hacbo_jax.experiments import report as R
from hacbo_jax.trainer.logs import RunLogger, read_jsonl

B, M = 3, 4


def _hacbo_stats(step):
    mult = np.full((B, M), 1.0 / M)
    mult[0] *= 2.0 if step >= 20 else 1.0
    probation = np.array([False, step >= 20, False])
    return {
        "kind": "hacbo",
        "agreement": np.linspace(0, 1, B),
        "cosine": np.zeros(B),
        "layer_weights": np.full(B, 1 / B),
        "multipliers": mult,
        "probation": probation,
        "l_active": int(B - probation.sum()),
    }


def _blac_stats(step):
    frozen = np.array([step >= 30, False, False])
    return {
        "kind": "blac",
        "agreement": np.zeros(B),
        "cosine": np.zeros(B),
        "layer_weights": np.full(B, 1 / B),
        "multipliers": np.where(frozen, 0.0, 1.5),
        "frozen": frozen,
        "l_active": int(B - frozen.sum()),
    }


def _make_run(
    root,
    name,
    *,
    method,
    seed,
    stats=None,
    losses=(2.0, 1.5, 1.0, 0.8),
    em=0.25,
    summary=True,
    diverged=False,
):
    """A run directory in the contracts' layout, written through RunLogger."""
    run_dir = root / name
    with RunLogger(run_dir) as log:
        for i, loss in enumerate(losses):
            step = 10 * (i + 1)
            log.log_metrics(
                step,
                {
                    "epoch": step / 40,
                    "loss": np.float32(loss),
                    "lr": jnp.float32(1e-4),
                    "grad_norm": 1.0,
                    "update_norm": 0.5,
                    "tokens_per_s": 100.0,
                    "skipped_steps": 0,
                    "energy_kwh": None,
                    "controller": None if stats is None else stats(step),
                },
            )
        log.log_eval(10 * len(losses), exact_match=em, n=200, epoch=1.0)
        if summary:
            log.write_summary(
                {
                    "method": method,
                    "seed": seed,
                    "steps": 10 * len(losses),
                    "final_exact_match": em,
                    "final_train_loss": float(losses[-1]),
                    "diverged": diverged,
                    "skipped_steps": 0,
                    "wall_time_s": 123.4,
                    "energy_kwh": 0.0125 if method != "adamw" else None,
                    "energy_source": "rapl" if method != "adamw" else "unavailable",
                }
            )
    (run_dir / "config.yaml").write_text(f"method: {method}\nseed: {seed}\n")
    return run_dir


# -- logs ----------------------------------------------------------------------------------------


def test_logger_writes_flushed_json_lines(tmp_path):
    log = RunLogger(tmp_path / "run")
    log.log_metrics(
        5,
        {
            "loss": jnp.float32(0.5),
            "per_block": jnp.arange(3),
            "nested": {"m": np.ones((2, 2), np.float32), "b": np.bool_(True)},
            "nan": float("nan"),
        },
    )
    log.log_eval(5, exact_match=np.float64(0.125), n=np.int64(8), epoch=0.5)
    # readable while the logger is still open: each line is flushed
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert rows[0]["step"] == 5 and rows[0]["loss"] == 0.5 and rows[0]["per_block"] == [0, 1, 2]
    assert rows[0]["nested"] == {"m": [[1.0, 1.0], [1.0, 1.0]], "b": True}
    assert math.isnan(rows[0]["nan"])
    assert read_jsonl(tmp_path / "run" / "eval.jsonl") == [
        {"step": 5, "epoch": 0.5, "exact_match": 0.125, "n": 8}
    ]
    log.write_summary({"steps": np.int32(5)})
    log.close()
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"steps": 5}


def test_resume_truncates_later_steps_and_torn_lines(tmp_path):
    with RunLogger(tmp_path) as log:
        for step in (10, 20, 30, 40):
            log.log_metrics(step, {"loss": float(step)})
            log.log_eval(step, exact_match=0.1, n=1)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 50, "lo')  # a crash mid-line
    with RunLogger(tmp_path, resume_step=20) as log:
        log.log_metrics(30, {"loss": 3.0})
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [10, 20, 30]
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["loss"] == 3.0
    assert [r["step"] for r in read_jsonl(tmp_path / "eval.jsonl")] == [10, 20]
    with RunLogger(tmp_path) as log:  # a new run in the same directory starts afresh
        log.log_metrics(1, {"loss": 1.0})
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]
    assert read_jsonl(tmp_path / "eval.jsonl") == []


def test_optional_mirrors(tmp_path, monkeypatch):
    scalars, wandb_calls = [], []

    class FakeWriter:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            scalars.append("closed")

    fake_run = types.SimpleNamespace(
        log=lambda d, step: wandb_calls.append((d, step)),
        finish=lambda: wandb_calls.append("finished"),
    )
    fake_wandb = types.SimpleNamespace(init=lambda **kw: wandb_calls.append(kw) or fake_run)
    monkeypatch.setitem(
        sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=FakeWriter)
    )
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    with RunLogger(tmp_path, tensorboard=True, wandb=True, config={"seed": 1}) as log:
        log.log_metrics(
            10,
            {"loss": 0.5, "controller": {"l_active": 3, "cosine": [0.1, 0.2]}, "energy_kwh": None},
        )
        log.log_eval(10, exact_match=0.25, n=4)
    assert ("train/loss", 0.5, 10) in scalars and ("train/controller/l_active", 3.0, 10) in scalars
    assert ("eval/exact_match", 0.25, 10) in scalars and scalars[-1] == "closed"
    assert not any("cosine" in s[0] for s in scalars[:-1])  # lists stay in the JSON lines
    assert wandb_calls[0]["mode"] == "offline" and wandb_calls[0]["config"] == {"seed": 1}
    assert ({"train/loss": 0.5, "train/controller/l_active": 3.0}, 10) in wandb_calls
    assert wandb_calls[-1] == "finished"


def test_missing_mirrors_warn(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.warns(RuntimeWarning, match="tensorboardX is not installed"):
        with pytest.warns(RuntimeWarning, match="wandb is not installed"):
            RunLogger(tmp_path, tensorboard=True, wandb=True).close()


# -- report --------------------------------------------------------------------------------------


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    return [
        _make_run(root, "hacbo", method="hacbo", seed=0, stats=_hacbo_stats, em=0.4567),
        _make_run(
            root,
            "blac",
            method="blac",
            seed=1,
            stats=_blac_stats,
            losses=(2.0, 1.9, float("nan"), float("nan")),
            em=0.0,
            diverged=True,
        ),
        _make_run(root, "adamw", method="adamw", seed=0, em=0.5),
    ]


def test_load_run_reads_the_layout(runs):
    hacbo = R.load_run(runs[0])
    assert (hacbo.method, hacbo.seed, hacbo.steps, hacbo.controller_kind) == (
        "hacbo",
        0,
        40,
        "hacbo",
    )
    assert hacbo.final_exact_match == 0.4567 and hacbo.final_loss == pytest.approx(0.8)
    steps, mult = hacbo.controller_matrix("multipliers")
    np.testing.assert_array_equal(steps, [10, 20, 30, 40])
    # HACBO multipliers are summed over the M sub-modules: block 0 doubles from step 20 on
    np.testing.assert_allclose(mult, [[1, 2, 2, 2], [1, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(hacbo.controller_matrix("probation")[1][1], [0, 1, 1, 1])
    blac = R.load_run(runs[1])
    assert blac.diverged and blac.controller_matrix("frozen")[1][0].tolist() == [0, 0, 1, 1]
    assert R.load_run(runs[2]).controller_matrix("multipliers") is None


def test_values_fall_back_to_logs_without_summary(tmp_path):
    run_dir = _make_run(
        tmp_path,
        "r",
        method="hacbo",
        seed=3,
        stats=_hacbo_stats,
        losses=(1.0, float("nan")),
        em=0.3,
        summary=False,
    )
    run = R.load_run(run_dir)
    assert (run.method, run.seed, run.steps, run.final_exact_match) == ("hacbo", 3, 20, 0.3)
    assert run.diverged and math.isnan(run.final_loss)


def test_report_files_and_table(runs, tmp_path):
    out = tmp_path / "out"
    assert R.main([str(r) for r in runs] + ["--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "report.md",
        "loss.png",
        "exact_match.png",
        "multipliers_hacbo_seed0.png",
        "status_hacbo_seed0.png",
        "multipliers_blac_seed1.png",
        "status_blac_seed1.png",
    } <= names
    assert not any("adamw" in n for n in names)  # no controller, no controller figures
    for name in names - {"report.md"}:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "report.md").read_text()
    rows = {
        line.split(" | ")[0].strip("| "): [c.strip() for c in line.strip("|\n ").split(" | ")]
        for line in table.splitlines()
        if line.startswith("| ") and "seed" in line.split(" | ")[0]
    }
    assert rows["hacbo/seed0"] == [
        "hacbo/seed0",
        "hacbo",
        "0",
        "40",
        "0.8000",
        "45.67",
        "no",
        "123",
        "0.0125 (rapl)",
    ]
    assert rows["blac/seed1"] == [
        "blac/seed1",
        "blac",
        "1",
        "40",
        "NaN",
        "0.00",
        "yes",
        "123",
        "0.0125 (rapl)",
    ]
    assert rows["adamw/seed0"][5:] == ["50.00", "no", "123", "n/a"]
    assert "![loss](loss.png)" in table and "![status_blac_seed1](status_blac_seed1.png)" in table


def test_duplicate_labels_are_disambiguated(tmp_path):
    a = _make_run(tmp_path / "a", "seed0", method="hacbo", seed=0)
    b = _make_run(tmp_path / "b", "seed0", method="hacbo", seed=0)
    c = _make_run(tmp_path / "c", "x", method="hacbo", seed=0)
    runs = [R.load_run(d) for d in (a, b, c)]
    R._unique_labels(runs)
    assert len({r.label for r in runs}) == 3


def test_run_dir_without_metrics_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(R.RunDirError, match="no metrics.jsonl"):
        R.load_run(tmp_path / "empty")
    with pytest.raises(R.RunDirError, match="not a directory"):
        R.load_run(tmp_path / "missing")
    assert R.main([str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    with pytest.raises(R.RunDirError, match="integer 'step'"):
        R.load_run(tmp_path / "bad")
