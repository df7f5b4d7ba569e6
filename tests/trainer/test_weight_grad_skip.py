"""Skipping the weight gradients of idle blocks in the training step
(``controller.skip_weight_grads``): the skipping step equals, in every update and every state,
the dense step that computes the same gradients and zeroes the idle blocks (bitwise here), for
AdaGradSelect, BLAC with frozen blocks and HACBO gamma = 0 with blocks in probation, on
unrolled and scanned layers; and each controller's idle blocks are the ones its update leaves
at exactly zero."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hacbo_jax.controllers import controlled_leaves
from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from hacbo_jax.trainer.controller_registry import (
    AdaGradSelectConfig,
    BLACConfig,
    HACBOConfig,
    build_controller,
    controller_idle_blocks,
    find_controller_state,
)
from hacbo_jax.trainer.recipes import qwen3_labels
from hacbo_jax.trainer.step import (
    Batch,
    TrainState,
    WeightGradSkip,
    build_optimizer,
    learning_rate_schedule,
    make_train_step,
    make_train_steps,
)

CFG = Qwen3Config(
    vocab_size=61,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=4,
    initializer_range=0.2,
)
LAYERS = CFG.num_hidden_layers
STEPS = 5
STEPS_PER_EPOCH = 3  # AdaGradSelect: epsilon is 0 from step 3 on, so later steps draw


def _batches(seed=0, accum=1, micro=3, length=9):
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(STEPS):
        ids = rs.randint(1, CFG.vocab_size, (accum, micro, length)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[:, 0, -2:] = 0
        loss_mask = np.zeros(ids.shape, np.float32)
        loss_mask[..., 3:-2] = 1.0
        targets = np.roll(ids, -1, axis=-1)
        out.append(Batch(*(jnp.asarray(x) for x in (ids, mask, targets, loss_mask))))
    return out


def _controller(kind):
    if kind == "adagradselect":
        return AdaGradSelectConfig(pct=0.25)
    if kind == "blac":
        return BLACConfig(interval=1000)  # no measurement in these steps
    return HACBOConfig(interval=1000, gamma=0.0)


def _preset(kind, opt_state):
    """BLAC: blocks 1 and 2 frozen; HACBO: blocks 0 and 2 in probation (half the blocks)."""
    state = find_controller_state(opt_state)
    if kind == "blac":
        new = state._replace(frozen=jnp.asarray([False, True, True, False]))
    elif kind == "hacbo":
        new = state._replace(probation=jnp.asarray([True, False, True, False]))
    else:
        return opt_state
    return jax.tree.map(lambda x: new if x is state else x, opt_state, is_leaf=lambda x: x is state)


@functools.cache
def _run(kind, scan, compute, clip=1.0):
    """(host states after each step, idle blocks before each step) of STEPS steps; ``compute``
    None: the default dense step, True: skipping, False: the dense step zeroing idle blocks."""
    model = Qwen3ForCausalLM(CFG, scan_layers=scan, remat="full", rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    labels = qwen3_labels(params)
    hyper = _controller(kind)
    run_args = {"steps_per_epoch": STEPS_PER_EPOCH, "seed": 0}
    controller = build_controller(kind, labels, hyper, **run_args)
    schedule = learning_rate_schedule(1e-2, 1, 100)
    tx = build_optimizer(
        schedule=schedule, b1=0.9, b2=0.99, weight_decay=0.1, clip_norm=clip, controller=controller
    )
    idle = controller_idle_blocks(kind, hyper, LAYERS, **run_args)
    skip = None if compute is None else WeightGradSkip(idle, labels, compute=compute)
    step = make_train_step(
        graphdef, rest, tx, schedule, dev_batch_size=1, uses_dev_grads=False, skip=skip
    )
    state = TrainState(
        jnp.int32(0), params, _preset(kind, tx.init(params)), jax.random.key_data(jax.random.key(0))
    )
    dev = jax.tree.map(lambda x: x[0], _batches(seed=9)[0])
    idle_seen, states = [], []
    for batch in _batches():
        idle_seen.append(np.asarray(idle(state.opt_state)))
        state, metrics = step(state, batch, dev)
        assert bool(metrics.finite)
        states.append(jax.device_get(state))
    return states, np.stack(idle_seen)


@pytest.mark.parametrize(
    "kind, scan",
    [
        ("adagradselect", True),
        *(
            pytest.param(kind, scan, marks=pytest.mark.slow)
            for kind, scan in [
                ("blac", True),
                ("hacbo", True),
                ("adagradselect", False),
                ("blac", False),
                ("hacbo", False),
            ]
        ),
    ],
)
def test_skipping_step_equals_the_dense_step_with_idle_blocks_zeroed(kind, scan):
    skipped, idle = _run(kind, scan, compute=True)
    reference, reference_idle = _run(kind, scan, compute=False)
    np.testing.assert_array_equal(idle, reference_idle)
    assert idle.any(), "the test must exercise idle blocks"
    assert not idle.all()
    for got, want in zip(skipped, reference):
        jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("adagradselect", marks=pytest.mark.slow),
        pytest.param("blac", marks=pytest.mark.slow),
        pytest.param("hacbo", marks=pytest.mark.slow),
    ],
)
def test_idle_blocks_are_exactly_the_blocks_whose_update_is_zero(kind):
    """Without skipping (the dense step), the blocks a controller declares idle before a step
    get exactly zero parameter change at that step."""
    states, idle = _run(kind, scan=True, compute=None)
    previous = None
    for state, idle_now in zip(states, idle):
        if previous is not None:
            layers_before = previous.params["model"]["layers"]
            layers_after = state.params["model"]["layers"]
            for before, after in zip(jax.tree.leaves(layers_before), jax.tree.leaves(layers_after)):
                moved = np.any(
                    np.asarray(before) != np.asarray(after), axis=tuple(range(1, before.ndim))
                )
                assert not np.any(moved & idle_now), (kind, idle_now, moved)
        previous = state


def test_adagradselect_idle_units_are_empty_on_epsilon_steps_and_drawn_otherwise():
    _, idle = _run("adagradselect", True, compute=True)  # the skipping run (cached)
    k = 1  # pct 0.25 of 4 blocks
    assert not idle[0].any()  # step 1 always takes the epsilon branch
    for row in idle[STEPS_PER_EPOCH:]:  # epsilon 0: every step draws k blocks
        assert int((~row).sum()) == k


def _blac_measuring_run(compute, separate_dev_pass):
    """BLAC measuring every other step (K = 2), blocks 1 and 2 frozen, through the loop's two
    programs (:func:`make_train_steps`); the measurement skips the frozen blocks too."""
    model = Qwen3ForCausalLM(CFG, scan_layers=True, remat="full", rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    labels = qwen3_labels(params)
    hyper = BLACConfig(interval=2, freeze_after=0)
    controller = build_controller("blac", labels, hyper)
    schedule = learning_rate_schedule(1e-2, 1, 100)
    tx = build_optimizer(
        schedule=schedule, b1=0.9, b2=0.99, weight_decay=0.1, clip_norm=1.0, controller=controller
    )
    skip = WeightGradSkip(
        controller_idle_blocks("blac", hyper, LAYERS), labels, compute=compute, when_measuring=True
    )
    steps = make_train_steps(
        graphdef,
        rest,
        tx,
        schedule,
        interval=2,
        dev_batch_size=2,
        separate_dev_pass=separate_dev_pass,
        controlled=controlled_leaves(labels, params),
        skip=skip,
    )
    state = TrainState(
        jnp.int32(0),
        params,
        _preset("blac", tx.init(params)),
        jax.random.key_data(jax.random.key(0)),
    )
    dev_buffer = jax.tree.map(lambda x: x[0], _batches(seed=9, micro=4)[0])
    out = []
    for batch in _batches():
        count = int(find_controller_state(state.opt_state).count)
        state, metrics = steps.pick(count)(state, batch, dev_buffer)
        assert bool(metrics.finite)
        out.append(jax.device_get(state))
    assert int(find_controller_state(state.opt_state).count) >= 4  # two measurements taken
    return out


@pytest.mark.slow
@pytest.mark.parametrize("separate_dev_pass", [True, False])
def test_blac_measurement_skips_frozen_blocks_exactly(separate_dev_pass):
    skipped = _blac_measuring_run(True, separate_dev_pass)
    reference = _blac_measuring_run(False, separate_dev_pass)
    for got, want in zip(skipped, reference):
        jax.tree.map(np.testing.assert_array_equal, got, want)
    frozen = np.asarray(find_controller_state(skipped[-1].opt_state).frozen)
    assert frozen[1] and frozen[2]


MESH_SCRIPT = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
sys.path.insert(0, sys.argv[1])
import test_weight_grad_skip as T
from hacbo_jax.trainer import sharding as sharding_lib
from hacbo_jax.trainer.controller_registry import (
    AdaGradSelectConfig, build_controller, controller_idle_blocks,
)
from hacbo_jax.trainer.recipes import qwen3_labels
from hacbo_jax.trainer.step import (
    TrainState, WeightGradSkip, build_optimizer, learning_rate_schedule, make_train_step,
    step_shardings,
)

model = T.Qwen3ForCausalLM(T.CFG, scan_layers=True, remat="full", rngs=nnx.Rngs(0))
graphdef, params, rest = nnx.split(model, nnx.Param, ...)
params = nnx.to_pure_dict(params)
labels = qwen3_labels(params)
hyper = AdaGradSelectConfig(pct=0.25)
run_args = {"steps_per_epoch": T.STEPS_PER_EPOCH, "seed": 0}
schedule = learning_rate_schedule(1e-2, 1, 100)
tx = build_optimizer(schedule=schedule, b1=0.9, b2=0.99, weight_decay=0.1, clip_norm=1.0,
                     controller=build_controller("adagradselect", labels, hyper, **run_args))
skip = WeightGradSkip(controller_idle_blocks("adagradselect", hyper, T.LAYERS, **run_args), labels)
rng = jax.random.key_data(jax.random.key(0))
batches = T._batches(micro=4)
dev = jax.tree.map(lambda x: x[0], batches[0])
finals = []
for mesh_shape in [(1, 1), (1, 2)]:
    state = TrainState(jnp.int32(0), params, tx.init(params), rng)
    shardings = None
    if mesh_shape != (1, 1):
        mesh = sharding_lib.make_mesh(*mesh_shape)
        abstract = jax.eval_shape(lambda p: TrainState(jnp.int32(0), p, tx.init(p), rng), params)
        shardings = step_shardings(mesh, abstract, dev_batch_size=1, min_elements=0)
        state = jax.device_put(state, shardings.state)
    step = make_train_step(graphdef, rest, tx, schedule, dev_batch_size=1, uses_dev_grads=False,
                           skip=skip, shardings=shardings, donate=False)
    for batch in batches:
        state, metrics = step(state, batch, dev if shardings is None else jax.device_put(dev, shardings.dev_buffer))
    finals.append(jax.device_get(state.params))
    if shardings is not None:
        kernel = state.params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
        print("devices", len(kernel.sharding.device_set))
diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])))
scale = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(finals[0]))
print("maxdiff", diff, "scale", scale)
"""


@pytest.mark.slow
def test_skipping_step_on_a_two_device_mesh_matches_one_device():
    """The skip under FSDP (2 forced CPU devices, params and moments sharded) gives the
    single-device result (up to the order of sharded reductions)."""
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(here.parents[0])}
    proc = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT, str(here)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert lines["devices"] == "2"
    diff, _, scale = lines["maxdiff"].split()
    assert float(diff) <= 1e-5 * float(scale), proc.stdout
