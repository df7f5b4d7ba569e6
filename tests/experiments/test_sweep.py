"""hacbo_jax.experiments.sweep with a stand-in run function: log-uniform search, seeded, best rate written and
applied by hacbo_jax.experiments.compare.run."""

from __future__ import annotations

from hacbo_jax.trainer.config import CONFIGS_DIR

import math
from pathlib import Path

import pytest
import yaml

import optuna  # noqa: F401  (in the test extras: the sweep tests must not skip)

from hacbo_jax.experiments.compare import run as compare  # noqa: E402
from hacbo_jax.experiments import sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = CONFIGS_DIR / "compare_cpu.yaml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A directory the config accepts as a model (the fake runs never load it)."""
    path = tmp_path_factory.mktemp("sweep_model")
    (path / "config.json").write_text("{}")
    (path / "tokenizer_config.json").write_text("{}")  # model.tokenizer defaults to the model's
    return path


def fake_run(calls: list):
    """Exact match peaks at lr = 1e-3 (a smooth function of log lr)."""

    def run(cfg, *, show_progress=False):
        calls.append(cfg)
        em = math.exp(-((math.log10(cfg.optim.lr) + 3.0) ** 2))
        return {"final_exact_match": em, "final_train_loss": 1.0, "diverged": False}

    return run


def test_sweep_searches_log_uniform_and_keeps_the_best(model_dir, tmp_path):
    calls: list = []
    result = sweep.sweep_method(
        CONFIG,
        "blac",
        trials=6,
        lo=1e-5,
        hi=1e-1,
        seed=3,
        out_dir=tmp_path / "sweep",
        overrides=[f"model.path={model_dir}"],
        run_fn=fake_run(calls),
    )
    lrs = [c.optim.lr for c in calls]
    assert len(lrs) == 6 and all(1e-5 <= lr <= 1e-1 for lr in lrs)
    assert all(c.controller.kind == "blac" and c.method == "blac" for c in calls)
    assert [Path(c.output_dir).name for c in calls] == [f"trial{i}" for i in range(6)]
    best = max(result["trials"], key=lambda t: t["exact_match"])
    assert result["lr"] == best["lr"] and result["exact_match"] == best["exact_match"]
    # same seed -> same proposals
    again: list = []
    sweep.sweep_method(
        CONFIG,
        "blac",
        trials=6,
        lo=1e-5,
        hi=1e-1,
        seed=3,
        out_dir=tmp_path / "sweep2",
        overrides=[f"model.path={model_dir}"],
        run_fn=fake_run(again),
    )
    assert [c.optim.lr for c in again] == lrs


def test_written_lrs_are_applied_by_compare(model_dir, tmp_path):
    out = tmp_path / "lrs.yaml"
    out.write_text(yaml.safe_dump({"lr": {"adamw": 5e-4}}))  # kept: not swept this time
    results = sweep.sweep(
        CONFIG,
        ["hacbo"],
        write=out,
        log=lambda _: None,
        trials=2,
        lo=1e-4,
        hi=1e-2,
        seed=0,
        out_dir=tmp_path / "sweep",
        overrides=[f"model.path={model_dir}"],
        run_fn=fake_run([]),
    )
    lrs = compare.load_lrs(out)
    assert lrs == {"adamw": 5e-4, "hacbo": results["hacbo"]["lr"]}
    runs = compare.plan_runs(
        CONFIG,
        ["adamw", "hacbo", "hacbo_no_refresh", "blac"],
        [0],
        tmp_path / "cmp",
        [f"model.path={model_dir}"],
        lrs,
    )
    by_method = {r.method: r.config.optim.lr for r in runs}
    assert by_method["adamw"] == 5e-4
    assert by_method["hacbo"] == by_method["hacbo_no_refresh"] == results["hacbo"]["lr"]
    base_lr = compare.load_config(CONFIG, [f"model.path={model_dir}"]).optim.lr
    assert by_method["blac"] == base_lr  # not in the file, no fallback: the base config's rate


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="0 < lo < hi"):
        sweep.sweep_method(CONFIG, "hacbo", lo=1e-2, hi=1e-3, run_fn=fake_run([]))
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        sweep.sweep_method(CONFIG, "sgd", run_fn=fake_run([]))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"lr": {"hacbo": -1}}))
    with pytest.raises(ValueError, match="lr.hacbo = -1"):
        compare.load_lrs(bad)
