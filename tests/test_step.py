"""hacbo_jax.training.step: the loss (plain and chunked) and optimiser assembly."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from hacbo_jax.training.step import Batch, learning_rate_schedule, make_loss_fn


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
