"""The training stack on a scan_layers Qwen3: stacked labels, stacked sharding rules, and HACBO /
BLAC steps equal to the same steps on the unrolled model ."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from hacbo_jax.trainer.sharding import FSDP_AXIS, partition_specs
from hacbo_jax.trainer.controller_registry import BLACConfig, HACBOConfig, build_controller
from hacbo_jax.trainer.recipes import QWEN3_RULES, qwen3_labels
from hacbo_jax.trainer.step import Batch, TrainState, build_optimizer, make_train_step

CFG = Qwen3Config(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    initializer_range=0.2,
)
LAYERS = CFG.num_hidden_layers


@pytest.fixture(scope="module", autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _split(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), rest


def unstack(tree):
    """A scanned-model tree (params, or an optimiser state mirroring them) in the unrolled
    layout: ``layers/<module path>`` [L, ...] becomes ``layers/<i>/<module path>``."""
    if isinstance(tree, dict):
        out = {k: unstack(v) for k, v in tree.items()}
        layers = out.get("layers")
        if isinstance(layers, dict) and not any(isinstance(k, int) for k in layers):
            out["layers"] = {i: jax.tree.map(lambda x, i=i: x[i], layers) for i in range(LAYERS)}
        return out
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(unstack(x) for x in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(unstack(x) for x in tree)
    return tree


@pytest.fixture(scope="module")
def models():
    """(unrolled, scanned) graphdef/params/rest with the same weights."""
    plain = _split(Qwen3ForCausalLM(CFG, rngs=nnx.Rngs(0)))
    g, scanned_params, r = _split(Qwen3ForCausalLM(CFG, scan_layers=True, rngs=nnx.Rngs(1)))
    layers = plain[1]["model"]["layers"]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(layers[i] for i in range(LAYERS)))
    params = {**plain[1], "model": {**plain[1]["model"], "layers": stacked}}
    assert jax.tree.structure(params) == jax.tree.structure(scanned_params)
    return plain, (g, params, r)


@pytest.mark.slow
def test_stacked_labels(models):
    plain, scanned = models
    labels = qwen3_labels(scanned[1])
    layers = labels["model"]["layers"]
    assert layers["mlp"]["up_proj"]["kernel"] == "*/mlp"
    assert layers["self_attn"]["k_proj"]["kernel"] == "*/attn_qkv"
    assert layers["self_attn"]["o_proj"]["kernel"] == "*/attn_out"
    assert layers["self_attn"]["q_norm"]["weight"] == "*/ln"
    assert layers["post_attention_layernorm"]["weight"] == "*/ln"
    assert labels["model"]["embed_tokens"]["weight"] == "other"
    # the same sub-module as layer i of the unrolled model, for every leaf
    flat = qwen3_labels(plain[1])
    expect = jax.tree.map(lambda s: s.split("/", 1)[-1], flat)
    per_layer = jax.tree.map(lambda s: np.array([s] * LAYERS) if s[0] == "*" else s, labels)
    got = jax.tree.map(lambda s: str(s).split("/", 1)[-1], unstack(per_layer))
    assert got == expect
    assert flat["model"]["layers"][2]["mlp"]["down_proj"]["kernel"] == "2/mlp"


@pytest.mark.slow
def test_stacked_leaves_are_never_sharded_along_the_layer_axis(models):
    plain, scanned = models
    mesh = {"data": 1, "fsdp": 2}
    specs = partition_specs(scanned[1], mesh, QWEN3_RULES, min_elements=0)
    plain_specs = partition_specs(plain[1], mesh, QWEN3_RULES, min_elements=0)
    layers = specs["model"]["layers"]
    for path, spec in jax.tree_util.tree_flatten_with_path(
        layers, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )[0]:
        assert len(spec) == 0 or spec[0] is None, (path, spec)
    # the same array axis as the unrolled layer's, shifted past the layer axis
    for name in ("q_proj", "o_proj"):
        unrolled = plain_specs["model"]["layers"][0]["self_attn"][name]["kernel"]
        assert tuple(layers["self_attn"][name]["kernel"]) == (None, *unrolled)
    for name in ("gate_proj", "down_proj"):
        unrolled = plain_specs["model"]["layers"][0]["mlp"][name]["kernel"]
        assert tuple(layers["mlp"][name]["kernel"]) == (None, *unrolled)
    assert tuple(layers["mlp"]["up_proj"]["kernel"]) == (None, None, FSDP_AXIS)
    assert tuple(layers["input_layernorm"]["weight"]) == ()
    # D = 32 not divisible by 3: the [L, D, N, H] q_proj goes to N... (4 % 3 != 0) H (8 % 3):
    # nothing fits -> replicated, never the layer axis (3 % 3 == 0)
    odd = partition_specs(scanned[1], {"data": 1, "fsdp": 3}, QWEN3_RULES, min_elements=0)
    assert tuple(odd["model"]["layers"]["self_attn"]["q_proj"]["kernel"]) == ()


def _batches(steps, micro=4, length=10, seed=0):
    rs = np.random.RandomState(seed)

    def batch(n):
        ids = rs.randint(1, CFG.vocab_size, (n, length)).astype(np.int32)
        mask = np.ones_like(ids)
        for row in range(n):
            mask[row, rs.randint(length // 2, length + 1) :] = 0
        ids = ids * mask
        targets = np.zeros_like(ids)
        targets[:, :-1] = ids[:, 1:]
        loss_mask = np.zeros(ids.shape, np.float32)
        loss_mask[:, 2:-1] = mask[:, 3:]
        return Batch(*(jnp.asarray(x) for x in (ids, mask, targets, loss_mask)))

    train = [jax.tree.map(lambda x: x[None], batch(micro)) for _ in range(steps)]
    return train, batch(8)


@pytest.mark.slow  # ~100 s each on the loaded 2-core machine (two models compiled per kind)
@pytest.mark.parametrize(
    ("kind", "hyper"),
    [
        ("hacbo", HACBOConfig(interval=2, patience=1, theta_neg=0.9, update_norm_budget=0.05)),
        ("blac", BLACConfig(interval=2, freeze_after=2, update_norm_budget=0.05)),
    ],
)
def test_controller_steps_on_scanned_equal_unrolled(models, kind, hyper):
    """4 steps (measurements at 1 and 3: K = 2), fp32: same updates, params and states."""
    schedule = lambda step: 1e-2
    train, dev_buffer = _batches(4)
    states = []
    for graphdef, params, rest in models:
        tx = build_optimizer(
            schedule=schedule,
            b1=0.9,
            b2=0.95,
            weight_decay=0.1,
            clip_norm=1.0,
            controller=build_controller(kind, qwen3_labels(params), hyper),
        )
        step = make_train_step(
            graphdef, rest, tx, schedule, dev_batch_size=4, uses_dev_grads=True, donate=False
        )
        state = TrainState(
            jnp.int32(0), params, tx.init(params), jax.random.key_data(jax.random.key(0))
        )
        trail = []
        for batch in train:
            state, metrics = step(state, batch, dev_buffer)
            trail.append((state, metrics))
        states.append(trail)
    for (plain, plain_metrics), (scanned, scanned_metrics) in zip(*states, strict=True):
        np.testing.assert_allclose(scanned_metrics.loss, plain_metrics.loss, rtol=1e-5)
        np.testing.assert_allclose(
            scanned_metrics.update_norm, plain_metrics.update_norm, rtol=1e-5
        )
        unstacked = unstack(jax.device_get(scanned))
        assert jax.tree.structure(unstacked) == jax.tree.structure(jax.device_get(plain))
        for (path, a), b in zip(
            jax.tree_util.tree_flatten_with_path(unstacked)[0], jax.tree.leaves(plain), strict=True
        ):
            name = jax.tree_util.keystr(path)
            if np.issubdtype(np.asarray(a).dtype, np.floating):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
            else:
                np.testing.assert_array_equal(a, b, err_msg=name)
    # the controller did something: a measurement was taken and the multipliers moved
    controller_state = jax.device_get(states[1][-1][0].opt_state.inner_state[-1])
    assert np.any(np.asarray(controller_state.cosine) != 0)
