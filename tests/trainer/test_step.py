"""hacbo_jax.trainer.step: the loss (plain and chunked) and optimiser assembly."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from hacbo_jax.trainer.step import Batch, learning_rate_schedule, make_loss_fn


@pytest.fixture(scope="module")
def model_and_batch():
    config = Qwen3Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
    )
    model = Qwen3ForCausalLM(config, rngs=nnx.Rngs(0))
    rs = np.random.RandomState(0)
    ids = rs.randint(0, 97, (3, 13)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
    loss_mask = np.zeros(ids.shape, np.float32)
    loss_mask[:, 5:12] = 1.0
    loss_mask[1, 8:] = 0.0
    return model, Batch(*map(jnp.asarray, (ids, mask, targets, loss_mask)))


@pytest.mark.slow
def test_answer_nll_by_hand(model_and_batch):
    model, batch = model_and_batch
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    total, count = make_loss_fn(graphdef, rest)(nnx.to_pure_dict(params), batch)
    logits = np.asarray(model(batch.input_ids, batch.attention_mask), np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    picked = np.take_along_axis(logp, np.asarray(batch.targets)[..., None], -1)[..., 0]
    expected = -(picked * np.asarray(batch.loss_mask)).sum()
    assert float(count) == float(np.asarray(batch.loss_mask).sum()) == 7 + 3 + 7
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [5, 13])  # several chunks with padding; one whole chunk
def test_chunked_loss_matches_plain_loss_and_gradient(model_and_batch, chunk):
    model, batch = model_and_batch
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    plain = make_loss_fn(graphdef, rest)
    chunked = make_loss_fn(graphdef, rest, logits_chunk=chunk)
    grad = lambda fn: jax.jit(jax.value_and_grad(lambda p: fn(p, batch)[0]))(params)
    (value, grads), (value_c, grads_c) = grad(plain), grad(chunked)
    np.testing.assert_allclose(float(value_c), float(value), rtol=1e-5)
    chex.assert_trees_all_close(grads_c, grads, rtol=1e-4, atol=1e-6)
    assert float(chunked(params, batch)[1]) == float(plain(params, batch)[1])


def test_schedule_warms_up_then_decays_to_zero():
    schedule = learning_rate_schedule(1e-3, 10, 100)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="warmup_steps=100"):
        learning_rate_schedule(1e-3, 100, 100)


def test_runs_that_differ_only_in_their_rate_compile_one_program():
    """The peak rate is a value in the optimiser state, not a constant of the compiled update,
    so the cells of a learning-rate grid share compiled programs (JAX's persistent cache keys
    on the program text); the updates and the step metric's rate still follow each run's rate
    exactly as plain ``optax.adamw(schedule)`` does."""
    from hacbo_jax.trainer.config.schema import OptimConfig
    from hacbo_jax.trainer.step import applied_learning_rate

    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones([4])}
    grads = jax.tree.map(lambda p: 0.3 * p + 0.1, params)

    def lowered_and_run(lr):
        tx, schedule = OptimConfig(lr=lr, warmup_steps=2, clip_norm=None).build(10)
        update = jax.jit(lambda g, s, p: tx.update(g, s, p))
        state = tx.init(params)
        text = update.lower(grads, state, params).as_text()
        rates, all_updates = [], []
        for _ in range(4):
            rates.append(float(applied_learning_rate(state, schedule)))
            updates, state = update(grads, state, params)
            all_updates.append(updates)
        return text, rates, all_updates

    text_a, rates_a, _ = lowered_and_run(1e-3)
    text_b, rates_b, updates_b = lowered_and_run(4e-3)
    assert text_a == text_b
    reference = optax.adamw(learning_rate_schedule(4e-3, 2, 10), b1=0.9, b2=0.95, weight_decay=0.1)
    state = reference.init(params)
    for step, updates in enumerate(updates_b):
        expected, state = reference.update(grads, state, params)
        chex.assert_trees_all_close(updates, expected, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(
            rates_b[step], float(learning_rate_schedule(4e-3, 2, 10)(step)), rtol=1e-6
        )
    np.testing.assert_allclose(rates_a, np.array(rates_b) / 4, rtol=1e-6)
