"""hacbo_jax.experiments.compare.run: method -> overrides mapping, resumability, the report, and (tiny model, a few
steps) that the ablation switches change what they claim to change."""

from __future__ import annotations

from hacbo_jax.trainer.config import CONFIGS_DIR

import fcntl
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from hacbo_jax.experiments.compare import run as compare
from hacbo_jax.trainer.config import config_to_dict, save_config
from hacbo_jax.trainer.finetune import run as finetune_run
from hacbo_jax.trainer.logs import read_jsonl
from hacbo_jax.experiments.stats import mean_ci, paired_ttest
from support.checkpoints import make_tiny_checkpoint
from support.fake_runs import FAKE_EM, FakeRun

ROOT = Path(__file__).resolve().parents[2]
CONFIG = CONFIGS_DIR / "compare_cpu.yaml"


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


def quick(model_dir: Path, *extra: str) -> list[str]:
    """compare_cpu.yaml cut to 4 steps of 8: K = 2, F = 1, refresh every 2 steps, log every step."""
    return [
        f"model.path={model_dir}",
        "data.synthetic.n_train=48",
        "data.synthetic.n_eval=4",
        "data.heldout_size=16",
        "data.max_len=96",
        "optim.batch_size=8",
        "optim.warmup_steps=1",
        "optim.max_steps=4",
        "controller.hacbo.interval=2",
        "controller.hacbo.patience=1",
        "microdev.size=8",
        "microdev.batch_size=4",
        "microdev.refresh_every=2",
        "microdev.max_candidates=4",
        "eval.limit=4",
        "eval.max_new_tokens=4",
        "eval.batch_size=4",
        "logging.every=1",
        "checkpoint.every=0",
        *extra,
    ]


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# ---- the mapping ----------------------------------------------------------------------------

EXPECTED_CHANGE = {  # method -> the keys (other than 'method') that differ from hacbo's config
    "adamw": {"controller.kind": "none"},
    "blac": {"controller.kind": "blac"},
    "adagradselect": {"controller.kind": "adagradselect"},
    "hacbo_gamma0": {"controller.hacbo.gamma": 0.0},
    "hacbo_share_uniform": {"controller.hacbo.probation_share": "uniform"},
    "hacbo_no_curvature": {"controller.hacbo.curvature_weighting": False},
    "hacbo_no_refresh": {"microdev.refresh_every": 0},
    "hacbo_no_probation": {"controller.hacbo.probation": False},
    "hacbo_debias": {"controller.hacbo.debias": True},
}


def test_each_method_changes_exactly_what_it_names(model_dir, tmp_path):
    specs = compare.plan_runs(
        CONFIG, list(compare.METHODS), [3], tmp_path, [f"model.path={model_dir}"]
    )
    configs = {s.method: flat(config_to_dict(s.config)) for s in specs}
    reference = configs["hacbo"]
    assert reference["controller.kind"] == "hacbo" and reference["seed"] == 3
    assert set(EXPECTED_CHANGE) == set(compare.METHODS) - {"hacbo"}
    for method, expected in EXPECTED_CHANGE.items():
        diff = {k: v for k, v in configs[method].items() if v != reference[k]}
        assert diff.pop("method") == method
        assert diff.pop("output_dir") == str(tmp_path / "runs" / method / "seed3")
        assert diff == expected, method


def test_parse_methods():
    assert compare.parse_methods("all") == list(compare.METHODS)
    assert compare.parse_methods(" adamw, hacbo ") == ["adamw", "hacbo"]
    with pytest.raises(ValueError, match="unknown method 'hacbo_fast'"):
        compare.parse_methods("hacbo,hacbo_fast")
    with pytest.raises(ValueError, match="twice"):
        compare.parse_methods("hacbo,hacbo")


# ---- resumability and the report ------------------------------------------------------------

@pytest.mark.slow
def test_comparison_skips_finished_runs_and_resumes_interrupted_ones(model_dir, tmp_path):
    out, fake = tmp_path / "cmp", FakeRun()

    def compare_once(*extra):
        return compare.run_comparison(
            CONFIG,
            ["adamw", "hacbo"],
            [0, 1, 2],
            out,
            overrides=[f"model.path={model_dir}", *extra],
            run_fn=fake,
            log=lambda _: None,
            base_eval=False,
        )

    report = compare_once()
    assert sorted(fake.calls) == sorted((m, s, False) for m in ("adamw", "hacbo") for s in range(3))
    fake.calls.clear()
    compare_once()
    assert fake.calls == []  # every run finished with the same config: nothing runs again

    interrupted = out / "runs" / "hacbo" / "seed1"
    (interrupted / "summary.json").unlink()
    (interrupted / "checkpoints" / "3").mkdir(parents=True)
    compare_once()
    assert fake.calls == [("hacbo", 1, True)]

    fake.calls.clear()
    compare_once("optim.lr=1e-3")  # another config: every run is outdated and runs afresh
    assert len(fake.calls) == 6 and not any(resume for _, _, resume in fake.calls)
    assert not (interrupted / "checkpoints").exists()

    text = report.read_text()
    for name in ("exact_match_ci.png", "controlled_fraction.png", "loss.png"):
        assert (out / name).is_file() and f"({name})" in text
    hacbo_em = [100 * FAKE_EM["hacbo", s] for s in range(3)]
    adamw_em = [100 * FAKE_EM["adamw", s] for s in range(3)]
    ci = mean_ci(hacbo_em)
    assert f"{ci.mean:.2f} [{ci.low:.2f}, {ci.high:.2f}]" in text
    test = paired_ttest(hacbo_em, adamw_em)
    assert (
        f"| adamw | 3 | {test.mean_diff:+.2f} | [{test.ci_low:+.2f}, {test.ci_high:+.2f}] | "
        f"{test.t:.2f} | {test.p:.3g} |" in text
    )
    # one of two equal blocks in probation at seed 1 only: 1/6 of the time, mean over seeds
    assert "16.7%, 16.7%" in text


def test_execute_runs_leaves_alone_a_run_that_another_process_holds(model_dir, tmp_path):
    specs = compare.plan_runs(
        CONFIG, ["adamw", "hacbo"], [0], tmp_path, [f"model.path={model_dir}"]
    )
    fake, held = FakeRun(), specs[0].run_dir
    held.parent.mkdir(parents=True)
    with open(compare.run_lock_path(held), "a") as f:  # another process running adamw seed 0
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        counts = compare.execute_runs(specs, run_fn=fake, log=lambda _: None, lock=True)
        assert fake.calls == [("hacbo", 0, False)] and counts == (1, 1, 0)
        assert not held.exists()  # not mistaken for a stale run and deleted
        # without locking, the old behaviour: every unfinished run runs
        compare.execute_runs(specs, run_fn=fake, log=lambda _: None)
        assert fake.calls[-1] == ("adamw", 0, False)
    (held / "summary.json").unlink()
    # its holder exited (the kernel drops the lock): the run is free again
    assert compare.execute_runs(specs, run_fn=fake, log=lambda _: None, lock=True) == (1, 1, 0)


# ---- the switches, in real runs of a tiny model ---------------------------------------------


@pytest.mark.slow
def test_ablation_switches_act_in_training(model_dir, tmp_path):
    """A HACBO run vs one with the three ablation switches of METHODS at once, under a setting
    where probation is reachable at every measurement (theta_neg = 1, F = 1)."""
    forced = ["controller.hacbo.theta_neg=1.0"]
    combined = [
        o
        for m in ("hacbo_no_probation", "hacbo_no_refresh", "hacbo_no_curvature")
        for o in compare.METHODS[m]
    ]
    base = compare.load_config(CONFIG, quick(model_dir, *forced, f"output_dir={tmp_path / 'a'}"))
    ablated = compare.load_config(
        CONFIG, quick(model_dir, *forced, *combined, f"output_dir={tmp_path / 'b'}")
    )
    runs = {}
    for name, cfg in (("hacbo", base), ("ablated", ablated)):
        summary = finetune_run(cfg, show_progress=False)
        runs[name] = (summary, read_jsonl(Path(cfg.output_dir) / "metrics.jsonl"))

    summary, rows = runs["ablated"]
    assert summary["microdev_refreshes"] == 0
    assert len(rows) == 4 and not any(any(r["controller"]["probation"]) for r in rows)
    for r in rows:
        multipliers = np.asarray(r["controller"]["multipliers"])  # [B, M]
        np.testing.assert_allclose(
            multipliers, multipliers[:, :1] * np.ones_like(multipliers), rtol=1e-6
        )

    summary, rows = runs["hacbo"]
    assert summary["microdev_refreshes"] == 2  # steps 2 and 4
    spread = [np.ptp(np.asarray(r["controller"]["multipliers"]), axis=1).max() for r in rows]
    assert spread[0] == 0.0 and max(spread) > 1e-3  # v uniform until curvature is measured


@pytest.mark.parametrize("method, enters", [("hacbo", True), ("hacbo_no_probation", False)])
def test_probation_switch_reaches_the_controller(model_dir, tmp_path, method, enters):
    """The method's config, built into the controller as finetune does, with train and dev
    gradients of opposite sign (cosine -1): probation is entered unless switched off."""
    cfg = compare.load_config(
        CONFIG,
        [
            f"model.path={model_dir}",
            *compare.method_overrides(method),
            "controller.hacbo.interval=1",
            "controller.hacbo.patience=2",
        ],
    )
    params = {"a": jnp.ones(4), "b": jnp.ones(4)}
    tx = cfg.controller.build({"a": "0/mlp", "b": "1/mlp"})
    state = tx.init(params)
    grads = {"a": jnp.ones(4), "b": -jnp.ones(4)}
    dev = {"a": -jnp.ones(4), "b": jnp.ones(4)}
    seen = []
    for _ in range(3):
        _, state = tx.update(grads, state, params, train_grads=grads, dev_grads=dev)
        seen.append(np.asarray(state.probation).tolist())
    assert seen[0] == [False, False]  # F = 2 measurements needed
    assert seen[-1] == ([True, True] if enters else [False, False])
