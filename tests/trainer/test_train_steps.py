"""hacbo_jax.trainer.step.make_train_steps: an ordinary step without any dev gradient and a
measurement step, picked by the host from the controller's count."""

from __future__ import annotations

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hacbo_jax.controllers import controlled_leaves, dev_sign_sketch
from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from hacbo_jax.trainer.controller_registry import (
    HACBOConfig,
    build_controller,
    find_controller_state,
)
from hacbo_jax.trainer.recipes import qwen3_labels
from hacbo_jax.trainer.step import (
    Batch,
    TrainState,
    build_optimizer,
    learning_rate_schedule,
    make_dev_signs_fn,
    make_train_step,
    make_train_steps,
)

# Three compilations of a tiny Qwen3 step (~1.5 min on the loaded 2-core CPU).
pytestmark = pytest.mark.slow

K = 3
STEPS = 7


@pytest.fixture(scope="module")
def tiny():
    config = Qwen3Config(
        vocab_size=53,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        tie_word_embeddings=True,
    )
    graphdef, params, rest = nnx.split(Qwen3ForCausalLM(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    schedule = learning_rate_schedule(1e-2, 0, 50)
    controller = build_controller(
        "hacbo", qwen3_labels(params), HACBOConfig(interval=K, patience=2)
    )
    tx = build_optimizer(
        schedule=schedule, b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0, controller=controller
    )
    rs = np.random.RandomState(0)

    def batch(rows):
        ids = rs.randint(0, 53, (rows, 9)).astype(np.int32)
        targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
        loss_mask = np.zeros(ids.shape, np.float32)
        loss_mask[:, 3:8] = 1.0
        return Batch(*map(jnp.asarray, (ids, np.ones_like(ids), targets, loss_mask)))

    batches = [jax.tree.map(lambda x: x[None], batch(2)) for _ in range(STEPS)]
    dev_buffer = batch(6)
    state = TrainState(
        jnp.int32(0), params, tx.init(params), jax.random.key_data(jax.random.key(1))
    )
    common = dict(dev_batch_size=2, donate=False)
    steps = make_train_steps(graphdef, rest, tx, schedule, interval=K, **common)
    single = make_train_step(graphdef, rest, tx, schedule, uses_dev_grads=True, **common)
    plain_tx = build_optimizer(
        schedule=schedule, b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0, controller=None
    )
    plain = make_train_step(graphdef, rest, plain_tx, schedule, uses_dev_grads=False, **common)
    plain_state = state._replace(opt_state=plain_tx.init(params))
    setup = steps, single, state, batches, dev_buffer, (plain, plain_state)
    return setup, {
        "graphdef": graphdef,
        "rest": rest,
        "tx": tx,
        "schedule": schedule,
        "common": common,
    }


@pytest.fixture(scope="module")
def setup(tiny):
    return tiny[0]


def _run_two_functions(steps, state, batches, dev_buffer):
    count, picked = 0, []
    for batch in batches:
        measures = steps.measures_next(count)
        picked.append(measures)
        state, metrics = steps.pick(count)(state, batch, dev_buffer)
        count = int(jax.device_get(metrics.controller_count))
    return state, picked


def _run_single_step(single, state, batches, dev_buffer):
    for batch in batches:
        state, _ = single(state, batch, dev_buffer)
    return state


def _nan_batch(batch):
    return batch._replace(loss_mask=batch.loss_mask.at[0, 0, 4].set(jnp.nan))


@pytest.mark.slow
def test_two_functions_equal_the_single_step_when_no_step_is_skipped(setup):
    steps, single, state, batches, dev_buffer, _ = setup
    reference = _run_single_step(single, state, batches, dev_buffer)
    new, picked = _run_two_functions(steps, state, batches, dev_buffer)
    assert picked == [t % K == 0 for t in range(1, STEPS + 1)]
    chex.assert_trees_all_close(new.params, reference.params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(new.opt_state, reference.opt_state, rtol=1e-6, atol=1e-7)
    hacbo_state = find_controller_state(new.opt_state)
    assert int(hacbo_state.count) == STEPS and int(hacbo_state.missed_measurements) == 0
    assert float(np.abs(np.asarray(hacbo_state.agreement)).sum()) > 0  # it did measure


def test_a_skipped_step_keeps_the_measurements_aligned(setup):
    steps, _, state, batches, dev_buffer, _ = setup
    batches = list(batches)
    batches[1] = _nan_batch(batches[1])  # step 2 is rejected: count stays 1
    new, picked = _run_two_functions(steps, state, batches, dev_buffer)
    # Applied steps t = 1, (skip), 2, 3, 4, 5, 6: the calls 4 and 7 are t = 3 and t = 6.
    assert picked == [False, False, False, True, False, False, True]
    hacbo_state = find_controller_state(new.opt_state)
    assert int(hacbo_state.count) == STEPS - 1
    assert int(hacbo_state.missed_measurements) == 0
    assert int(hacbo_state.skipped_measurements) == 0
    assert int(new.opt_state.total_notfinite) == 1


def test_picking_by_step_number_would_miss_a_measurement(setup):
    # The rule the loop must not use (call number instead of the controller's count): after a
    # skipped step it calls the measurement step one step late and misses the due measurement.
    steps, _, state, batches, dev_buffer, _ = setup
    batches = list(batches)
    batches[1] = _nan_batch(batches[1])
    for call, batch in enumerate(batches, start=1):
        fn = steps.measurement if call % K == 0 else steps.ordinary
        state, _ = fn(state, batch, dev_buffer)
    assert int(find_controller_state(state.opt_state).missed_measurements) == 2


def _dot_count(fn, *args) -> int:
    jaxpr = jax.make_jaxpr(fn)(*args)

    def count(jaxpr):
        n = 0
        for eqn in jaxpr.eqns:
            n += eqn.primitive.name == "dot_general"
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                n += count(sub)
        return n

    return count(jaxpr.jaxpr)


def test_the_ordinary_step_traces_no_dev_backward(setup):
    steps, _, state, batches, dev_buffer, (plain, plain_state) = setup
    ordinary = _dot_count(steps.ordinary, state, batches[0], dev_buffer)
    measurement = _dot_count(steps.measurement, state, batches[0], dev_buffer)
    without_controller = _dot_count(plain, plain_state, batches[0], dev_buffer)
    # The ordinary step has exactly the matrix products of a step without any controller (one
    # forward and one backward); the measurement step adds the dev forward and backward.
    assert ordinary == without_controller
    assert measurement == 2 * without_controller


@pytest.mark.slow
def test_a_dev_program_of_the_controlled_leaves_skips_the_head_gradient(tiny):
    # The controllers read the dev gradient of controlled leaves only: the dev program that
    # differentiates just those computes no gradient of the tied embedding / LM head (one matrix
    # product fewer: on Qwen3-0.6B 0.58 GiB of fp32 gradient and 2 x 512 x 1024 x 151936 FLOPs
    # a row), returns an empty sketch there, and the run measures exactly as before.
    (_, single, state, batches, dev_buffer, _), parts = tiny
    controlled = controlled_leaves(qwen3_labels(state.params), state.params)
    assert not controlled["model"]["embed_tokens"]["weight"]
    assert controlled["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    g, r = parts["graphdef"], parts["rest"]
    full = make_dev_signs_fn(g, r, dev_batch_size=2)
    restricted = make_dev_signs_fn(g, r, dev_batch_size=2, controlled=controlled)
    assert _dot_count(restricted, state, dev_buffer) == _dot_count(full, state, dev_buffer) - 1

    sketch, full_sketch = restricted(state, dev_buffer), full(state, dev_buffer)
    for mask, got, want in zip(
        jax.tree.leaves(controlled), jax.tree.leaves(sketch), jax.tree.leaves(full_sketch)
    ):
        assert got.dtype == jnp.uint8
        if mask:
            np.testing.assert_array_equal(got, want)
        else:
            assert got.shape == (0, 0)
    # dev_sign_sketch with the same mask gives the same tree from a full gradient
    grads = jax.tree.map(jnp.ones_like, state.params)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        dev_sign_sketch(grads, controlled), jax.eval_shape(lambda: sketch)
    )

    steps_c = make_train_steps(
        g,
        r,
        parts["tx"],
        parts["schedule"],
        interval=K,
        controlled=controlled,
        **parts["common"],
    )
    reference = _run_single_step(single, state, batches, dev_buffer)
    new, _ = _run_two_functions(steps_c, state, batches, dev_buffer)
    chex.assert_trees_all_close(new.params, reference.params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(new.opt_state, reference.opt_state, rtol=1e-6, atol=1e-7)
    assert int(find_controller_state(new.opt_state).skipped_measurements) == 0
