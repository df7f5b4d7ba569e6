"""The training CLI never loses a run, never trains on nothing, never shows a traceback.

One test (or a few) per class of hostile input; each failed on the code before its fix.
"""

from __future__ import annotations

from hacbo_jax.trainer.config import CONFIGS_DIR

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hacbo_jax.models.qwen3 import Qwen3ForCausalLM
from hacbo_jax.trainer import finetune
from hacbo_jax.trainer.config import ConfigError, load_config
from hacbo_jax.trainer.step import (
    Batch,
    TrainState,
    build_optimizer,
    learning_rate_schedule,
    make_train_step,
)
from support.runs import CONFIG, quick_overrides, read_jsonl, restored_params
from support.checkpoints import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def cli(overrides, *flags) -> int:
    return finetune.main(["--config", str(CONFIG), *flags, *overrides])


def without_speed(rows):
    drop = ("tokens_per_s", "energy_kwh")
    return [{k: v for k, v in m.items() if k not in drop} for m in rows]


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, tmp_path_factory):
    """12 uninterrupted steps (logging every 2, checkpoints every 5)."""
    run_dir = tmp_path_factory.mktemp("straight")
    cfg = load_config(CONFIG, quick_overrides(tiny_model_dir, run_dir))
    finetune.run(cfg, show_progress=False)
    return run_dir


# -- 1. an existing run is never overwritten ---------------------------------------------------


def test_existing_output_dir_is_refused_without_resume(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    assert cli(quick_overrides(tiny_model_dir, out)) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--resume" in err and "output_dir" in err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


# -- 2. non-finite hyper-parameters and non-finite updates ----------------------------------------


@pytest.mark.parametrize("value", ["inf", ".inf", "nan", ".nan", "1e400", "-.inf"])
def test_nonfinite_lr_is_a_config_error(value):
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(CONFIG, [f"optim.lr={value}"])


def test_every_float_key_must_be_finite():
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG, ["optim.weight_decay=.inf", "controller.hacbo.eps=.nan"])
    assert "optim.weight_decay" in str(info.value) and "controller.hacbo.eps" in str(info.value)


def test_absurd_lr_is_a_config_error():
    with pytest.raises(ConfigError, match="optim.lr = 1e"):
        load_config(CONFIG, ["optim.lr=1e38"])


@pytest.mark.slow
def test_nonfinite_update_is_skipped_like_a_nan_gradient(tiny_model_dir):
    """A finite gradient whose *update* is non-finite (controller x inf) leaves state untouched."""
    model = Qwen3ForCausalLM.from_pretrained(tiny_model_dir)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    schedule = learning_rate_schedule(1e-3, 0, 10)
    poison = optax.with_extra_args_support(optax.scale(jnp.inf))
    tx = build_optimizer(
        schedule=schedule, b1=0.9, b2=0.95, weight_decay=0.0, clip_norm=None, controller=poison
    )
    step = make_train_step(
        graphdef, rest, tx, schedule, dev_batch_size=1, uses_dev_grads=False, donate=False
    )
    ids = jnp.arange(1, 9, dtype=jnp.int32).reshape(1, 1, 8)
    batch = Batch(ids, jnp.ones_like(ids), jnp.roll(ids, -1, -1), jnp.ones(ids.shape, jnp.float32))
    state = TrainState(
        jnp.int32(0), params, tx.init(params), jax.random.key_data(jax.random.key(0))
    )
    new, metrics = step(state, batch, batch)
    assert np.isfinite(float(metrics.loss)) and np.isfinite(float(metrics.grad_norm))
    assert not bool(metrics.finite)
    assert int(metrics.consecutive_nonfinite) == 1 and int(metrics.total_nonfinite) == 1
    chex.assert_trees_all_equal(new.params, params)
    chex.assert_trees_all_equal(new.opt_state.inner_state, state.opt_state.inner_state)
    assert int(new.step) == 1


# -- 3. the divergence stop is exact ------------------------------------------------------------


def _nan_at_steps(monkeypatch, steps):
    """Steps (1-based) whose batch gets a NaN loss weight (a non-finite loss)."""
    real = finetune.build_run

    def build(cfg):
        parts = real(cfg)
        calls = [0]

        def poisoned(inner):
            def train_step(state, batch, dev):
                calls[0] += 1
                if calls[0] in steps:
                    batch = batch._replace(loss_mask=batch.loss_mask * jnp.nan)
                return inner(state, batch, dev)

            return train_step

        ordinary, measurement, interval = parts.train_steps
        parts.train_steps = type(parts.train_steps)(
            poisoned(ordinary), poisoned(measurement), interval
        )
        return parts

    monkeypatch.setattr(finetune, "build_run", build)


@pytest.mark.slow
def test_divergence_stop_is_exact_whatever_the_logging_interval(
    tiny_model_dir, tmp_path, monkeypatch
):
    _nan_at_steps(monkeypatch, range(3, 8))  # 5 non-finite steps in a row: 3..7
    out = tmp_path / "streak"
    overrides = quick_overrides(
        tiny_model_dir,
        out,
        "controller.kind=none",
        "divergence.max_consecutive_nonfinite=5",
        "logging.every=10",
    )
    assert cli(overrides) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"] and summary["steps"] == 7 and summary["skipped_steps"] == 5
    # The logged learning rate is the one the optimiser used: its count stood at 2 applied steps.
    cfg = load_config(CONFIG, overrides)
    schedule = learning_rate_schedule(cfg.optim.lr, cfg.optim.warmup_steps, 12)
    last = read_jsonl(out / "metrics.jsonl")[-1]
    assert last["step"] == 7
    assert last["lr"] == pytest.approx(float(schedule(2)), rel=1e-6)


# -- 4. --resume -------------------------------------------------------------------------------


def test_resume_refuses_changed_trajectory_keys_and_allows_the_rest(tiny_model_dir, tmp_path):
    from hacbo_jax.trainer.config.validate import resume_differences

    base = quick_overrides(tiny_model_dir, tmp_path / "r")
    saved = load_config(CONFIG, base)
    refused, allowed = resume_differences(
        saved, load_config(CONFIG, [*base, "optim.lr=1e-3", "seed=3", "logging.every=3"])
    )
    assert any("optim.lr" in line for line in refused) and any("seed" in line for line in refused)
    assert [line for line in allowed if "logging.every" in line]
    assert not [line for line in refused if "logging" in line]
    # max_steps may change when the run length (and so the schedule) stays the same:
    # 96 examples // 8 = 12 steps per epoch, so max_steps 12 and 20 both give 12 steps.
    refused, allowed = resume_differences(saved, load_config(CONFIG, [*base, "optim.max_steps=20"]))
    assert refused == [] and any("optim.max_steps" in line for line in allowed)
    refused, _ = resume_differences(saved, load_config(CONFIG, [*base, "optim.max_steps=10"]))
    assert any("optim.max_steps" in line for line in refused)


def test_resume_with_no_checkpoint_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "nothing"
    assert cli(quick_overrides(tiny_model_dir, out), "--resume") == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "no checkpoint" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_resume_misaligned_equals_straight_run_then_refuses_and_noops(
    straight_run, tiny_model_dir, tmp_path, capsys
):
    out = tmp_path / "resumed"
    overrides = quick_overrides(tiny_model_dir, out)
    cfg = load_config(CONFIG, overrides)
    # checkpoint.every=5, logging.every=2: the checkpoint at 5 falls inside a logging interval.
    assert finetune.run(cfg, show_progress=False, stop_after=5) == {"stopped_at": 5}
    capsys.readouterr()
    assert cli([*overrides, "optim.lr=1e-3", "data.synthetic.seed=4"], "--resume") == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "data.synthetic.seed" in err and "Traceback" not in err
    assert cli(quick_overrides(tiny_model_dir, out, "checkpoint.every=4"), "--resume") == 0
    out_text = capsys.readouterr()
    assert "checkpoint.every" in out_text.out + out_text.err  # allowed change, recorded
    assert without_speed(read_jsonl(out / "metrics.jsonl")) == without_speed(
        read_jsonl(straight_run / "metrics.jsonl")
    )
    chex.assert_trees_all_equal(restored_params(out), restored_params(straight_run))
    summary = (out / "summary.json").read_text()
    evals = (out / "eval.jsonl").read_text()
    # Resuming a finished run does nothing and says so.
    assert cli(overrides, "--resume") == 0
    assert "finished" in capsys.readouterr().out
    assert (out / "summary.json").read_text() == summary
    assert (out / "eval.jsonl").read_text() == evals


# -- 5. damaged checkpoints ----------------------------------------------------------------------


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_previous(
    straight_run, tiny_model_dir, tmp_path, capfd
):
    out = tmp_path / "damaged"
    overrides = quick_overrides(tiny_model_dir, out, "checkpoint.every=2")
    cfg = load_config(CONFIG, overrides)
    assert finetune.run(cfg, show_progress=False, stop_after=5) == {"stopped_at": 5}
    newest = out / "checkpoints" / "5" / "state"
    for f in newest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    capfd.readouterr()
    assert cli(overrides, "--resume") == 0
    err = capfd.readouterr().err
    assert "skipped checkpoint step 5" in err and "step 4" in err
    assert "Traceback" not in err and "asyncio" not in err
    assert without_speed(read_jsonl(out / "metrics.jsonl")) == without_speed(
        read_jsonl(straight_run / "metrics.jsonl")
    )
    chex.assert_trees_all_equal(restored_params(out), restored_params(straight_run))


# -- 6. content checks up front ------------------------------------------------------------------


def _expect_refused(overrides, capsys, *needles):
    out = Path(next(o for o in overrides if o.startswith("output_dir=")).split("=", 1)[1])
    with_built = []
    real = finetune.build_run
    finetune.build_run = lambda cfg: with_built.append(cfg) or real(cfg)
    try:
        rc = cli(overrides)
    except SystemExit as e:  # found while loading the config
        rc = e.code
    finally:
        finetune.build_run = real
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not with_built and not out.exists()
    for needle in needles:
        assert needle in err, err
    assert "Traceback" not in err
    return err


def test_bad_model_directories_exit_2_with_nothing_written(tiny_model_dir, tmp_path, capsys):
    bad_json = shutil.copytree(tiny_model_dir, tmp_path / "bad_json")
    (bad_json / "config.json").write_text("{not json")
    _expect_refused(
        quick_overrides(bad_json, tmp_path / "o1"), capsys, "config.json", str(bad_json)
    )
    other = shutil.copytree(tiny_model_dir, tmp_path / "other_type")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    _expect_refused(quick_overrides(other, tmp_path / "o2"), capsys, "gpt2")
    truncated = shutil.copytree(tiny_model_dir, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _expect_refused(quick_overrides(truncated, tmp_path / "o3"), capsys, "model.safetensors")
    shapes = shutil.copytree(tiny_model_dir, tmp_path / "shapes")
    (shapes / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    _expect_refused(quick_overrides(shapes, tmp_path / "o4"), capsys, "mlp")


def test_missing_tokenizer_exits_2(tiny_model_dir, tmp_path, capsys):
    model = shutil.copytree(tiny_model_dir, tmp_path / "no_tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink(missing_ok=True)
    _expect_refused(quick_overrides(model, tmp_path / "o"), capsys, "tokenizer")


def test_malformed_or_empty_jsonl_and_no_answer_token_exit_2(tiny_model_dir, tmp_path, capsys):
    good = '{"question": "1+1?", "answer": "2 #### 2"}\n'
    train = tmp_path / "train.jsonl"
    train.write_text(good * 60 + "{broken\n" + '{"question": "x"}\n')
    test = tmp_path / "test.jsonl"
    test.write_text(good * 4)
    gsm = [
        "data.task=gsm8k",
        f"data.train_file={train}",
        f"data.eval_file={test}",
        "data.heldout_size=16",
    ]
    err = _expect_refused(
        quick_overrides(tiny_model_dir, tmp_path / "o1", *gsm), capsys, "line 61", "line 62"
    )
    assert str(train) in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = _expect_refused(
        quick_overrides(tiny_model_dir, tmp_path / "o2", *gsm, f"data.train_file={empty}"),
        capsys,
        "no rows",
    )
    assert "-" not in err.split("no rows")[0][-40:]  # no "-64 training examples"
    _expect_refused(
        quick_overrides(tiny_model_dir, tmp_path / "o3", "data.max_len=8"),
        capsys,
        "data.max_len = 8",
        "answer token",
    )


def test_blocked_output_dir_exits_2(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    overrides = quick_overrides(tiny_model_dir, blocker / "run")
    assert cli(overrides) == 2
    assert "output_dir" in capsys.readouterr().err


# -- 7. SIGTERM ----------------------------------------------------------------------------------

_DRIVER = """
import os, signal, sys
from hacbo_jax.trainer import loop, finetune
real = loop.TrainingLoop.log_metrics
def log_metrics(self, step, interval):
    real(self, step, interval)
    if step == 4:
        os.kill(os.getpid(), signal.SIGTERM)  # a pre-emption notice in the middle of the run
loop.TrainingLoop.log_metrics = log_metrics
sys.exit(finetune.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_is_bit_exact(straight_run, tiny_model_dir, tmp_path):
    out = tmp_path / "preempted"
    overrides = quick_overrides(tiny_model_dir, out)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, "--config", str(CONFIG), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == finetune.EXIT_PREEMPTED, proc.stderr
    assert "Traceback" not in proc.stderr and "SIGTERM" in proc.stderr
    assert (out / "checkpoints" / "4").is_dir() and not (out / "summary.json").exists()
    assert cli(overrides, "--resume") == 0
    assert without_speed(read_jsonl(out / "metrics.jsonl")) == without_speed(
        read_jsonl(straight_run / "metrics.jsonl")
    )
    chex.assert_trees_all_equal(restored_params(out), restored_params(straight_run))


# -- 8. small lies -------------------------------------------------------------------------------


def test_hash_in_override_value_is_kept():
    cfg = load_config(CONFIG, ["method=run #2"])
    assert cfg.method == "run #2"
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(CONFIG, ["optim.lr=1e-4 # a comment"])  # not silently 1e-4


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("optim:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        load_config(path)


def test_abbreviated_flags_are_refused(capsys):
    with pytest.raises(SystemExit) as info:
        finetune.main(["--config", str(CONFIG), "--resum"])
    assert info.value.code == 2
    assert "--resum" in capsys.readouterr().err


def test_kind_none_is_not_labelled_hacbo():
    cfg = load_config(CONFIG, ["controller.kind=none"])
    assert cfg.method == "none"
    with pytest.raises(ConfigError, match="method"):
        load_config(CONFIG, ["controller.kind=none", "method=hacbo"])


# -- 9. a grid survives one broken run; reports say what is missing -----------------------------


def test_grid_survives_a_broken_run_and_reports_it(tiny_model_dir, tmp_path, capsys):
    from hacbo_jax.experiments.compare import run as compare
    from support.fake_runs import FakeRun

    out, fake = tmp_path / "grid", FakeRun()

    def run_fn(cfg, *, resume, show_progress):
        if (cfg.method, cfg.seed) == ("hacbo", 1):
            raise ValueError("checkpoint step 3 is incomplete or corrupt")
        return fake(cfg, resume=resume, show_progress=show_progress)

    report = compare.run_comparison(
        CONFIGS_DIR / "compare_cpu.yaml",
        ["adamw", "hacbo"],
        [0, 1, 2],
        out,
        overrides=[f"model.path={tiny_model_dir}"],
        run_fn=run_fn,
        log=lambda _: None,
        base_eval=False,
    )
    assert len(fake.calls) == 5  # every other run went on
    text = report.read_text()
    assert "Missing and failed runs" in text
    assert "| hacbo | 1 | failed: ValueError: checkpoint step 3 is incomplete or corrupt |" in text
    # --report-only on a partial grid says which runs it is missing.
    rc = compare.main(
        [
            "--config",
            str(CONFIGS_DIR / "compare_cpu.yaml"),
            "--methods",
            "adamw,hacbo",
            "--seeds",
            "4",
            "--out",
            str(out),
            "--report-only",
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "5 of 8 runs" in err and "hacbo seed 1: failed" in err and "adamw seed 3: missing" in err


def test_report_survives_malformed_config_and_rejects_malformed_metrics(tmp_path, capsys):
    from hacbo_jax.experiments import report

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": 1.5}\n')
    (run / "config.yaml").write_text("optim: [unclosed\n")
    assert report.main([str(run)]) == 0
    assert "config.yaml" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": "high"}\n[1, 2]\n')
    assert report.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and "Traceback" not in err
