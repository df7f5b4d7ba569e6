"""End-to-end tests of hacbo_jax.trainer.finetune on a tiny random Qwen3 (a few steps each)."""

from __future__ import annotations

import json
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from hacbo_jax.models.qwen3 import Qwen3ForCausalLM
from hacbo_jax.data import gsm8k as data_lib
from hacbo_jax.trainer import finetune
from hacbo_jax.trainer.config import load_config
from support.runs import CONFIG, quick_config, quick_overrides, read_jsonl, restored_params

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    cfg = quick_config(tiny_model_dir, run_dir)
    summary = finetune.run(cfg, show_progress=False)
    return run_dir, summary


@pytest.mark.slow
def test_end_to_end_run_writes_everything(reference_run, tiny_model_dir):
    run_dir, summary = reference_run
    assert summary["steps"] == 12 and not summary["diverged"]
    assert summary["skipped_steps"] == 0
    assert summary["microdev_refreshes"] == 3  # steps 4, 8, 12
    assert np.isfinite(summary["final_train_loss"])
    assert 0.0 <= summary["final_exact_match"] <= 1.0 and summary["eval_examples"] == 8
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(2, 13, 2))
    for m in metrics:
        controller = m["controller"]
        assert controller["kind"] == "hacbo"
        assert np.asarray(controller["multipliers"]).shape == (2, 4)
        assert len(controller["probation"]) == 2
        assert controller["l_active"] == 2 - sum(controller["probation"])
        # The loop calls the measurement step exactly when one is due: none is missed.
        assert controller["missed_measurements"] == 0 and controller["skipped_measurements"] == 0
        assert controller["count"] == m["step"] and 0 < controller["budget_scale"] <= 1
        assert m["lr"] >= 0 and np.isfinite(m["grad_norm"]) and m["tokens_per_s"] > 0
    # The first measurement is at step 3, so the step-2 record still has the initial state.
    assert metrics[0]["controller"]["agreement"] == [0.0, 0.0]
    assert summary["controller"]["missed_measurements"] == 0
    assert any(a > 0 for m in metrics[1:] for a in m["controller"]["agreement"])
    evals = read_jsonl(run_dir / "eval.jsonl")
    # eval.at_start (on in tiny_cpu.yaml) scores the base model at step 0.
    assert evals[0]["step"] == 0 and evals[0]["exact_match"] == summary["initial_exact_match"]
    assert evals[-1]["step"] == 12 and evals[-1]["n"] == 8
    assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == 8
    # The exported model loads with our loader and differs from the base model.
    base = Qwen3ForCausalLM.from_pretrained(tiny_model_dir)
    base_params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
    tuned = restored_params(run_dir)
    chex.assert_trees_all_equal_shapes_and_dtypes(base_params, tuned)
    diffs = jax.tree.leaves(
        jax.tree.map(lambda a, b: float(np.abs(a - b).max()), base_params, tuned)
    )
    assert max(diffs) > 0


@pytest.mark.slow  # one more tiny run (~1 min on the loaded CPU)
def test_adagradselect_run_logs_its_selection(tiny_model_dir, tmp_path):
    out = tmp_path / "ags"
    overrides = quick_overrides(
        tiny_model_dir,
        out,
        "controller.kind=adagradselect",
        "controller.adagradselect.pct=0.5",
        "eval.at_start=false",
    )
    summary = finetune.run(load_config(CONFIG, overrides), show_progress=False)
    assert summary["steps"] == 12 and not summary["diverged"]
    assert summary["microdev_refreshes"] == 0  # it takes no dev gradient
    metrics = read_jsonl(out / "metrics.jsonl")
    for m in metrics:
        stats = m["controller"]
        assert stats["kind"] == "adagradselect" and stats["count"] == m["step"]
        assert len(stats["selected"]) == 1  # k = max(1, floor(0.5 * 2))
        assert sum(stats["counts"]) == m["step"]  # sum f = k t
    assert summary["controller"]["counts"] == metrics[-1]["controller"]["counts"]


@pytest.mark.slow
def test_resume_is_exact(reference_run, tiny_model_dir, tmp_path):
    """6 steps, stop, resume for 6 more == 12 uninterrupted steps (params and logged metrics)."""
    ref_dir, ref_summary = reference_run
    cfg = quick_config(tiny_model_dir, tmp_path / "resumed")
    assert finetune.run(cfg, show_progress=False, stop_after=6) == {"stopped_at": 6}
    summary = finetune.run(cfg, resume=True, show_progress=False)
    assert summary["steps"] == 12
    ref_metrics = read_jsonl(ref_dir / "metrics.jsonl")
    metrics = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    drop = ("tokens_per_s", "energy_kwh")
    assert [{k: v for k, v in m.items() if k not in drop} for m in metrics] == [
        {k: v for k, v in m.items() if k not in drop} for m in ref_metrics
    ]
    chex.assert_trees_all_equal(restored_params(tmp_path / "resumed"), restored_params(ref_dir))
    assert summary["final_exact_match"] == ref_summary["final_exact_match"]
    assert summary["microdev_refreshes"] == ref_summary["microdev_refreshes"]


def _poison(rows):
    """tokenize_sft whose given training rows have a NaN loss weight (a non-finite loss)."""
    real = data_lib.tokenize_sft

    def tokenize(examples, tokenizer, max_len=512):
        arrays = real(examples, tokenizer, max_len)
        if len(examples) == 96:  # the training set, not the micro-dev pool
            mask = arrays.loss_mask.copy()
            mask[rows, 0] = np.nan
            arrays = data_lib.SFTArrays(
                arrays.input_ids, arrays.attention_mask, arrays.targets, mask, arrays.num_truncated
            )
        return arrays

    return tokenize


def test_nonfinite_steps_are_skipped(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(data_lib, "tokenize_sft", _poison([5]))
    cfg = quick_config(tiny_model_dir, tmp_path / "nan")
    summary = finetune.run(cfg, show_progress=False)
    # Row 5 sits in exactly one batch of the (single, 12-batch) epoch: one step skipped.
    assert summary["skipped_steps"] == 1 and not summary["diverged"]
    assert summary["steps"] == 12
    chex.assert_tree_all_finite(restored_params(tmp_path / "nan"))


def test_divergence_stops_cleanly_with_last_good_state(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(data_lib, "tokenize_sft", _poison(slice(None)))
    out = tmp_path / "diverged"
    overrides = quick_overrides(
        tiny_model_dir, out, "controller.kind=none", "divergence.max_consecutive_nonfinite=3"
    )
    assert finetune.main(["--config", str(CONFIG), *overrides]) == 3
    summary = json.loads((out / "summary.json").read_text())
    # The host reads the streak after every step (with the controller's count, one small read),
    # so the run stops exactly when the streak reaches 3.
    assert summary["diverged"] and summary["steps"] == 3 and summary["skipped_steps"] == 3
    # Every step was skipped, so the exported (last good) params are the base model's.
    base = Qwen3ForCausalLM.from_pretrained(tiny_model_dir)
    chex.assert_trees_all_equal(restored_params(out), nnx.to_pure_dict(nnx.state(base, nnx.Param)))
    assert (out / "checkpoints" / "3").is_dir()


def test_bad_override_stops_before_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(
            [
                "--config",
                str(CONFIG),
                "controller.hacbo.gamma=1.5",
                f"output_dir={tmp_path / 'never'}",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "controller.hacbo.gamma" in err and "1.5" in err
    assert not (tmp_path / "never").exists()


def test_microdev_larger_than_its_pool_is_refused(tiny_model_dir, tmp_path, capsys):
    # pool 'test' draws the buffer from the 8 eval problems; 16 cannot fit.
    overrides = quick_overrides(tiny_model_dir, tmp_path / "run", "microdev.pool=test")
    assert finetune.main(["--config", str(CONFIG), *overrides]) == 2
    err = capsys.readouterr().err
    assert "microdev.size = 16" in err and "8 examples" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_export_checkpoint_equals_the_final_export(reference_run, tmp_path):
    """``train.export_checkpoint``: the newest checkpoint as an HF directory holds the params the
    run exported at its end, and the controller state (HACBO's curvature EMA for the probe)."""
    from hacbo_jax.trainer.export import main as export_main

    run_dir, summary = reference_run
    out = tmp_path / "exported"
    assert export_main([str(run_dir), "--out", str(out)]) == 0
    exported = nnx.to_pure_dict(nnx.state(Qwen3ForCausalLM.from_pretrained(out), nnx.Param))
    chex.assert_trees_all_equal(exported, restored_params(run_dir))
    state = np.load(out / "controller_state.npz")
    assert state["curvature"].shape == (2, 4) and int(state["count"]) == summary["steps"]
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


def test_export_checkpoint_bad_run_dir_exits_2_without_traceback(tmp_path, capsys):
    from hacbo_jax.trainer.export import main as export_main

    assert export_main([str(tmp_path / "no_run"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "config.yaml" in err and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_eval_every_steps_logs_train_time_across_a_resume(tiny_model_dir, tmp_path):
    """eval.every = 4 scores steps 4, 8 and 12 (and the base at 0); every eval row carries the
    run's training clock (evaluation excluded), which survives a resume and never goes back."""
    out = tmp_path / "evals"
    cfg = quick_config(tiny_model_dir, out, "eval.every=4", "eval.every_epoch=false")
    assert finetune.run(cfg, show_progress=False, stop_after=6) == {"stopped_at": 6}
    summary = finetune.run(cfg, resume=True, show_progress=False)
    evals = read_jsonl(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 4, 8, 12]
    clocks = [e["train_time_s"] for e in evals]
    assert clocks[0] == 0.0 and all(b > a for a, b in zip(clocks, clocks[1:]))
    assert summary["train_time_s"] == pytest.approx(clocks[-1])
    # evaluation time is not training time: the clock runs slower than the wall
    assert 0 < summary["train_time_s"] < summary["wall_time_s"]
    assert summary["eval_time_s"] > 0
    cpu = [e["train_cpu_s"] for e in evals]
    assert cpu[0] == 0.0 and all(b > a for a, b in zip(cpu, cpu[1:]))
    assert summary["train_cpu_s"] == pytest.approx(cpu[-1])
