"""Meshes, partition rules and sharded training (hacbo_jax.trainer.sharding, train.distributed).

The multi-device checks run tests/sharding_runs.py once in a subprocess with 8 forced CPU
devices (XLA_FLAGS must be set before jax is imported; this process has one device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from hacbo_jax.trainer import sharding as sharding_lib
from hacbo_jax.controllers.labels import leaf_path
from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from hacbo_jax.trainer.recipes import QWEN3_RULES, qwen3_labels
from hacbo_jax.trainer import distributed
from hacbo_jax.trainer.config import Config, ConfigError, MeshConfig, OptimConfig, check_mesh
from hacbo_jax.trainer.controller_registry import build_controller
from hacbo_jax.trainer.step import (
    TrainState,
    build_optimizer,
    learning_rate_schedule,
)

ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = ROOT / "tests"
TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Mesh sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, fsdp, devices, expected",
    [
        (1, 1, 8, (1, 1)),
        (-1, 1, 8, (8, 1)),
        (-1, 2, 8, (4, 2)),
        (2, 4, 8, (2, 4)),
        (2, 2, 8, (2, 2)),  # a sub-mesh of the first 4 devices
    ],
)
def test_mesh_shape_resolves(data, fsdp, devices, expected):
    assert sharding_lib.resolve_mesh_shape(data, fsdp, devices) == expected


@pytest.mark.parametrize(
    "data, fsdp, devices, words",
    [
        (4, 4, 8, ["mesh.data=4", "mesh.fsdp=4", "16 devices", "8 are present"]),
        (-1, 3, 8, ["mesh.data=-1", "mesh.fsdp=3", "8 devices"]),
        (0, 1, 8, ["mesh.data=0", "positive"]),
        (-2, 1, 8, ["mesh.data=-2"]),
        (1, 0, 8, ["mesh.fsdp=0", "positive"]),
        (1, 16, 8, ["mesh.fsdp=16", "8 present"]),
        (1.5, 1, 8, ["mesh.data=1.5"]),
    ],
)
def test_mesh_shape_errors_name_the_sizes(data, fsdp, devices, words):
    with pytest.raises(ValueError) as info:
        sharding_lib.resolve_mesh_shape(data, fsdp, devices)
    for word in words:
        assert word in str(info.value)


def test_default_mesh_is_one_device_with_named_axes():
    mesh = sharding_lib.make_mesh()
    assert mesh.shape == {"data": 1, "fsdp": 1} and mesh.size == 1


def test_run_mesh_errors_are_config_errors(monkeypatch):
    cfg = Config(mesh=MeshConfig(data=2, fsdp=1))
    with pytest.raises(ConfigError, match=r"mesh.data=2 x mesh.fsdp=1 = 2 devices, but only 1"):
        check_mesh(cfg)
    # A micro-batch that does not split over the mesh (8 devices faked by an abstract mesh).
    monkeypatch.setattr(
        sharding_lib, "make_mesh", lambda data, fsdp: AbstractMesh((4, 2), ("data", "fsdp"))
    )
    cfg = Config(
        mesh=MeshConfig(data=4, fsdp=2),
        optim=OptimConfig(batch_size=12, micro_batch_size=6, warmup_steps=0),
    )
    with pytest.raises(ConfigError) as info:
        check_mesh(cfg)
    assert "optim.micro_batch_size = 6" in str(info.value) and "8 devices" in str(info.value)
    cfg = Config(
        mesh=MeshConfig(data=4, fsdp=2),
        optim=OptimConfig(batch_size=32, micro_batch_size=16, warmup_steps=0),
    )
    assert check_mesh(cfg).size == 8


# ---------------------------------------------------------------------------------------------
# Partition rules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, fsdp, spec",
    [
        ((1024, 3072), 4, P(None, "fsdp")),  # largest divisible axis
        ((3072, 1024), 8, P("fsdp", None)),
        ((1026, 512), 4, P(None, "fsdp")),  # 1026 is larger but not divisible by 4
        ((512, 512), 2, P("fsdp", None)),  # tie -> leading axis
        ((1000, 999), 7, P()),  # nothing divisible
        ((128,), 8, P()),  # small -> replicated
        ((1024, 3072), 1, P()),  # fsdp size 1
        ((), 8, P()),
    ],
)
def test_fsdp_spec(shape, fsdp, spec):
    assert sharding_lib.fsdp_spec(shape, fsdp, min_elements=1000) == spec


def _qwen3_0_6b_state():
    """Abstract TrainState of Qwen3-0.6B + apply_if_finite(chain(clip, adamw, hacbo))."""
    model = nnx.eval_shape(lambda: Qwen3ForCausalLM(Qwen3Config.qwen3_0_6b(), rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    schedule = learning_rate_schedule(1e-4, 1, 10)
    tx = build_optimizer(
        schedule=schedule,
        b1=0.9,
        b2=0.95,
        weight_decay=0.1,
        clip_norm=1.0,
        controller=build_controller("hacbo", qwen3_labels(params)),
    )
    return jax.eval_shape(
        lambda p: TrainState(jnp.int32(0), p, tx.init(p), jnp.zeros(2, jnp.uint32)), params
    )


def test_qwen3_rules_shard_params_moments_alike_and_replicate_controller():
    state = _qwen3_0_6b_state()
    specs = sharding_lib.partition_specs(state, {"data": 2, "fsdp": 4}, QWEN3_RULES)
    layer = specs.params["model"]["layers"][5]
    assert specs.params["model"]["embed_tokens"]["weight"] == P("fsdp", None)
    assert layer["self_attn"]["q_proj"]["kernel"] == P("fsdp", None, None)
    assert layer["self_attn"]["o_proj"]["kernel"] == P(None, None, "fsdp")
    assert layer["mlp"]["gate_proj"]["kernel"] == P(None, "fsdp")
    assert layer["mlp"]["down_proj"]["kernel"] == P("fsdp", None)
    assert layer["input_layernorm"]["weight"] == P()
    adam = specs.opt_state.inner_state[1][0]
    assert adam.mu == specs.params and adam.nu == specs.params
    controller = specs.opt_state.inner_state[2]
    assert type(controller).__name__ == "HACBOState"
    assert all(s == P() for s in controller if s is not None)  # None: an option that is off
    assert specs.step == P() and specs.rng == P() and adam.count == P()


def test_rule_that_does_not_divide_falls_back_to_fsdp_rule():
    tree = {
        "embed_tokens": {"weight": jax.ShapeDtypeStruct((1001, 4096), jnp.float32)},
        "other": jax.ShapeDtypeStruct((4, 3), jnp.float32),
    }
    specs = sharding_lib.partition_specs(
        tree, {"data": 1, "fsdp": 4}, QWEN3_RULES, min_elements=100
    )
    # 1001 rows do not split 4 ways: the shape rule shards the 4096 axis instead.
    assert specs["embed_tokens"]["weight"] == P(None, "fsdp")
    assert specs["other"] == P()


def test_path_names_and_per_device_bytes():
    tree = {
        "a": [jax.ShapeDtypeStruct((8, 6), jnp.float32)],
        "b": jax.ShapeDtypeStruct((5,), jnp.bfloat16),
    }
    paths = [leaf_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths == ["a/0", "b"]
    mesh = AbstractMesh((2, 4), ("data", "fsdp"))
    shardings = sharding_lib.named_shardings(mesh, {"a": [P("fsdp", None)], "b": P()})
    # (8 / 4) * 6 * 4 bytes + 5 * 2 bytes
    assert sharding_lib.per_device_bytes(tree, shardings) == 2 * 6 * 4 + 5 * 2


# ---------------------------------------------------------------------------------------------
# Multi-host plumbing (single-process paths)
# ---------------------------------------------------------------------------------------------


def test_distributed_initialize_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    assert not distributed.maybe_initialize({})
    assert not distributed.maybe_initialize({"HACBO_DISTRIBUTED": "0"})
    assert calls == []
    assert distributed.maybe_initialize({"HACBO_DISTRIBUTED": "1"})
    assert distributed.maybe_initialize(
        {
            "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
            "JAX_NUM_PROCESSES": "4",
            "JAX_PROCESS_ID": "3",
        }
    )
    assert calls == [
        {},
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3},
    ]


def test_single_process_global_batch_is_the_whole_batch():
    mesh = sharding_lib.make_mesh()
    sharding = jax.sharding.NamedSharding(mesh, sharding_lib.batch_spec(3, example_axis=1))
    rows = distributed.local_rows(sharding, (2, 4, 3), axis=1)
    assert rows == slice(0, 4)
    x = np.arange(24, dtype=np.int32).reshape(2, 4, 3)
    (out,) = distributed.global_batch((x[:, rows],), sharding, axis=1, global_rows=4)
    np.testing.assert_array_equal(np.asarray(out), x)
    assert out.sharding == sharding


# ---------------------------------------------------------------------------------------------
# 8 CPU devices (subprocess)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding_runs")
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        # support.checkpoints, for the tiny model of the finetune runs
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, str(TESTS_DIR / "trainer" / "sharding_runs.py"), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(out / "arrays.npz") as arrays:
        return dict(arrays), json.loads((out / "facts.json").read_text()), out


def _subtree(arrays: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def _assert_trees_close(actual: dict, expected: dict, **tol):
    assert actual.keys() == expected.keys() and actual
    for key in expected:
        if expected[key].dtype.kind in "fc":
            np.testing.assert_allclose(actual[key], expected[key], err_msg=key, **tol)
        else:
            np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["8x1", "4x2"])
def test_sharded_runs_match_one_device(mesh_runs, mesh):
    """7 steps with K = 3 (measurements at 3 and 6): same params and controller state."""
    arrays, facts, _ = mesh_runs
    assert facts["device_count"] == 8
    _assert_trees_close(_subtree(arrays, f"{mesh}/params/"), _subtree(arrays, "1x1/params/"), **TOL)
    reference = _subtree(arrays, "1x1/controller/")
    _assert_trees_close(_subtree(arrays, f"{mesh}/controller/"), reference, **TOL)
    np.testing.assert_allclose(arrays[f"{mesh}/losses"], arrays["1x1/losses"], **TOL)
    # The measurements happened and moved the state (so the comparison is not of zeros).
    assert reference["count"] == 7 and np.all(reference["agreement"] > 0.01)
    assert np.all(reference["curvature"] > 0) and np.all(reference["cosine"] != 0)


@pytest.mark.slow
def test_arrays_are_really_sharded(mesh_runs):
    _, facts, _ = mesh_runs
    assert facts["1x1"]["q_proj_devices"] == 1
    for mesh, rows in (("8x1", 32), ("4x2", 16)):  # q_proj kernel [32, 4, 8], D over fsdp
        assert facts[mesh]["q_proj_devices"] == 8
        assert facts[mesh]["q_proj_spec"] == "P('fsdp', None, None)"
        assert facts[mesh]["q_proj_mu_spec"] == facts[mesh]["q_proj_spec"]
        assert facts[mesh]["q_proj_shard_shape"] == [rows, 4, 8]
        assert facts[mesh]["agreement_spec"] == "P()"


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh, shape", [("2x4", {"data": 2, "fsdp": 4}), ("8x1", {"data": 8, "fsdp": 1})]
)
def test_checkpoint_from_4x2_restores_onto_another_mesh(mesh_runs, mesh, shape):
    arrays, facts, _ = mesh_runs
    _assert_trees_close(
        _subtree(arrays, f"restored/{mesh}/"), _subtree(arrays, "saved/4x2/"), rtol=0, atol=0
    )
    assert facts[f"restored/{mesh}"]["q_proj_mesh"] == shape
    assert facts[f"restored/{mesh}"]["step"] == 7 and facts[f"restored/{mesh}"]["meta"] == "4x2"
    if mesh == "8x1":  # training continues on the new mesh as it would have on the old one
        _assert_trees_close(_subtree(arrays, "next/8x1/"), _subtree(arrays, "next/4x2/"), **TOL)


@pytest.mark.slow
def test_per_host_rows_and_mesh_errors_on_eight_devices(mesh_runs):
    _, facts, _ = mesh_runs
    # 8 rows per micro-batch; devices 0-3 as process 0 and 4-7 as process 1.
    assert facts["fake_two_process_rows"] == [[0, 4], [4, 8]]
    assert facts["single_process_rows"] == "slice(0, 8, None)"
    errors = facts["mesh_errors"]
    assert "mesh.data=4 x mesh.fsdp=4 = 16 devices, but only 8" in errors["4x4"]
    assert "mesh.fsdp=3" in errors["-1x3"] and "mesh.data=0" in errors["0x2"]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_finetune_on_mesh_resumed_on_another_mesh_matches_one_device(mesh_runs):
    """hacbo_jax.trainer.finetune: 3 steps on 4x2, checkpoint, resume on 2x4 to step 6 == 6 steps on 1x1."""
    from hacbo_jax.models.qwen3 import Qwen3ForCausalLM as Model

    root = mesh_runs[2] / "finetune"
    reference = _read_jsonl(root / "1x1" / "metrics.jsonl")
    resumed = _read_jsonl(root / "resumed" / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [m["step"] for m in reference] == list(range(1, 7))
    for ours, ref in zip(resumed, reference):
        for key in ("loss", "grad_norm", "update_norm", "lr"):
            np.testing.assert_allclose(ours[key], ref[key], err_msg=key, **TOL)
        for key in ("agreement", "cosine", "layer_weights", "multipliers", "curvature"):
            np.testing.assert_allclose(
                ours["controller"][key], ref["controller"][key], err_msg=key, **TOL
            )
        assert ours["controller"]["probation"] == ref["controller"]["probation"]
    assert any(a > 0 for a in resumed[-1]["controller"]["agreement"])
    summary = json.loads((root / "resumed" / "summary.json").read_text())
    assert summary["steps"] == 6 and not summary["diverged"]
    tuned = [
        nnx.to_pure_dict(nnx.state(Model.from_pretrained(root / run / "hf_model"), nnx.Param))
        for run in ("resumed", "1x1")
    ]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), *tuned)


@pytest.mark.slow
def test_lora_on_mesh_resumed_on_another_mesh_matches_one_device(mesh_runs):
    """LoRA (rank 2, HACBO over the adapters): 3 steps on 4x2 with the frozen base sharded,
    resumed on 2x4 to step 6 == 6 steps on one device, metrics and exported adapters alike."""
    from safetensors.numpy import load_file

    root = mesh_runs[2] / "finetune"
    reference = _read_jsonl(root / "lora_1x1" / "metrics.jsonl")
    resumed = _read_jsonl(root / "lora_resumed" / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [m["step"] for m in reference] == list(range(1, 7))
    for ours, ref in zip(resumed, reference):
        for key in ("loss", "grad_norm", "update_norm"):
            np.testing.assert_allclose(ours[key], ref[key], err_msg=key, **TOL)
        for key in ("agreement", "multipliers"):
            np.testing.assert_allclose(
                ours["controller"][key], ref["controller"][key], err_msg=key, **TOL
            )
    adapters = [
        load_file(root / run / "adapter" / "adapter_model.safetensors")
        for run in ("lora_resumed", "lora_1x1")
    ]
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    for key in adapters[1]:
        np.testing.assert_allclose(adapters[0][key], adapters[1][key], err_msg=key, **TOL)
