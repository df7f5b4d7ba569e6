"""LoRA in the training stack: ``lora.*`` config keys, adapters-only training (AdamW and the
controllers over the adapters), the run's ``adapter/`` (PEFT) and merged ``hf_model/`` exports,
resume, and bad input refused (exit 2) before any work."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from support.runs import CONFIG, quick_config, quick_overrides

from hacbo_jax.models.lora import add_lora, merge_lora
from hacbo_jax.models.lora_peft import load_adapter, save_adapter
from hacbo_jax.models.qwen3 import Qwen3ForCausalLM
from hacbo_jax.trainer import finetune
from hacbo_jax.trainer.recipes import qwen3_labels
from hacbo_jax.trainer.run_parts import build_run

TWO_STEPS = ("optim.max_steps=2", "optim.warmup_steps=0", "checkpoint.every=1", "eval.limit=4")


def _params(model) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in flat}


def test_lora_config_trains_the_adapters_grouped_by_block_and_submodule(tiny_model_dir, tmp_path):
    cfg = quick_config(
        tiny_model_dir, tmp_path / "run", "lora.rank=4", "lora.targets=q_proj,o_proj,mlp",
        "controller.kind=hacbo", *TWO_STEPS,
    )
    parts = build_run(cfg)
    assert parts.lora
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.State(parts.state.params))}
    assert paths and all("/lora/lora_" in p for p in paths)  # only adapters are trained
    labels = set(jax.tree.leaves(qwen3_labels(parts.state.params)))
    assert labels == {f"{i}/{g}" for i in range(2) for g in ("attn_qkv", "attn_out", "mlp")}
    base = nnx.to_flat_state(parts.rest)
    assert not any("lora" in "/".join(map(str, p)) for p, _ in base)
    merged = parts.model_at(parts.state.params)  # plain projections, equal to the base at B = 0
    reference = Qwen3ForCausalLM.from_pretrained(tiny_model_dir)
    ids = np.arange(10).reshape(1, 10)
    np.testing.assert_allclose(merged(ids), reference(ids), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("controller", ["none", "hacbo"])
def test_a_lora_run_changes_only_the_adapters_and_exports_both_forms(
    tiny_model_dir, tmp_path, controller
):
    run_dir = tmp_path / "run"
    extra = ("lora.rank=4", "lora.alpha=8", f"controller.kind={controller}",
             "controller.hacbo.interval=1", *TWO_STEPS)
    summary = finetune.run(quick_config(tiny_model_dir, run_dir, *extra), show_progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["final_train_loss"])
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    # the merged export = base + the saved adapter, merged; norms and embeddings untouched
    exported = _params(Qwen3ForCausalLM.from_pretrained(run_dir / "hf_model"))
    base_model = Qwen3ForCausalLM.from_pretrained(tiny_model_dir)
    base = _params(base_model)
    rebuilt = _params(merge_lora(load_adapter(base_model, run_dir / "adapter")))
    assert exported.keys() == base.keys() == rebuilt.keys()
    changed = {k for k in base if not np.array_equal(base[k], exported[k])}
    assert changed and all(k.endswith("_proj/kernel") for k in changed)
    for k in base:
        np.testing.assert_allclose(exported[k], rebuilt[k], atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_a_lora_run_resumes_to_the_same_adapters(tiny_model_dir, tmp_path):
    extra = ("lora.rank=2", "controller.kind=none", "optim.max_steps=3", "optim.warmup_steps=0",
             "checkpoint.every=1", "eval.limit=4", "eval.every_epoch=false")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    finetune.run(quick_config(tiny_model_dir, straight, *extra), show_progress=False)
    cfg = quick_config(tiny_model_dir, stopped, *extra)
    assert "stopped_at" in finetune.run(cfg, show_progress=False, stop_after=1)
    assert not (stopped / "adapter").exists()
    finetune.run(cfg, resume=True, show_progress=False)
    from safetensors.numpy import load_file

    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(stopped / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)


def _adapter(tmp_path, model_dir, rank: int):
    directory = tmp_path / f"adapter_r{rank}"
    save_adapter(add_lora(Qwen3ForCausalLM.from_pretrained(model_dir), rank), directory)
    return directory


def test_a_matching_adapter_is_the_runs_starting_point(tiny_model_dir, tmp_path):
    directory = _adapter(tmp_path, tiny_model_dir, 4)
    model = load_adapter(Qwen3ForCausalLM.from_pretrained(tiny_model_dir), directory)
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        v.set_value(v[...] + 0.05)  # nonzero B: the start is recognisably the adapter's
    save_adapter(model, directory)
    cfg = quick_config(tiny_model_dir, tmp_path / "run", "lora.rank=4",
                       f"lora.adapter={directory}", "controller.kind=none", *TWO_STEPS)
    parts = build_run(cfg)
    want = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    jax.tree.map(np.testing.assert_allclose, parts.state.params, want)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora.rank=0"], "lora.rank = 0: must be a value >= 1"),
        (["lora.rank=4", "lora.targets=q_proj,qkv"], "unknown LoRA target module(s) ['qkv']"),
        (["lora.rank=4", "lora.dropout=0.1"], "lora.dropout = 0.1: must be 0 in a training run"),
        (["lora.rank=40"], "LoRA rank 40 is larger than the smaller dimension of q_proj"),
        (["lora.adapter=ADAPTER"], "lora.adapter = "),
        (["lora.rank=2", "lora.adapter=ADAPTER"], "LoRA rank = 4, but the model's adapters have 2"),
        (["lora.rank=4", "lora.targets=attn", "lora.adapter=ADAPTER"], "LoRA targets = "),
        (["lora.rank=4", "lora.adapter=NOWHERE"], "is not a directory"),
    ],
)
def test_bad_lora_input_exits_2_before_any_work(
    tiny_model_dir, tmp_path, capsys, overrides, message
):
    directory = _adapter(tmp_path, tiny_model_dir, 4)
    overrides = [
        o.replace("ADAPTER", str(directory)).replace("NOWHERE", str(tmp_path / "nowhere"))
        for o in overrides
    ]
    run_dir = tmp_path / "run"
    args = quick_overrides(tiny_model_dir, run_dir, *overrides)
    try:  # a key's own check refuses while the command line is parsed (argparse's exit 2)
        status = finetune.main(["--config", str(CONFIG), *args])
    except SystemExit as e:
        status = e.code
    assert status == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()
