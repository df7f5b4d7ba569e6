"""HACBO's ``record_true_cosine`` option: the cosine of the gradients themselves per block,
recorded beside the sign-cosine at measurement steps, computed by hand here; off by default
(the state and every update unchanged), and refused with a sign sketch."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hacbo_jax import dev_sign_sketch, hacbo

LABELS = {"a": "0/mlp", "b": "0/attn", "c": "1/mlp", "stack": "*/attn", "emb": "other"}


def _tree(seed):
    rs = np.random.RandomState(seed)
    return {
        "a": jnp.asarray(rs.randn(3, 4), jnp.float32),
        "b": jnp.asarray(rs.randn(5), jnp.float32),
        "c": jnp.asarray(rs.randn(2, 2), jnp.float32),
        "stack": jnp.asarray(rs.randn(2, 3, 2), jnp.float32),
        "emb": jnp.asarray(rs.randn(7), jnp.float32),
    }


def _hand_cosine(train, dev):
    """Per block: block 0 = a, b, stack[0]; block 1 = c, stack[1]."""
    out = []
    for block in (0, 1):
        t = [train["a"], train["b"]] if block == 0 else [train["c"]]
        d = [dev["a"], dev["b"]] if block == 0 else [dev["c"]]
        t = np.concatenate([np.ravel(x) for x in t] + [np.ravel(train["stack"][block])])
        d = np.concatenate([np.ravel(x) for x in d] + [np.ravel(dev["stack"][block])])
        out.append(np.dot(t, d) / (np.linalg.norm(t) * np.linalg.norm(d)))
    return np.asarray(out)


def test_true_cosine_is_recorded_at_a_measurement_as_computed_by_hand():
    params, train, dev = _tree(0), _tree(1), _tree(2)
    dev = {**dev, "a": train["a"] * 0.5 + dev["a"]}  # some agreement
    tx = hacbo(LABELS, interval=1, record_true_cosine=True)
    state = tx.init(params)
    chex.assert_trees_all_equal(state.true_cosine, jnp.zeros(2))
    updates = jax.tree.map(lambda g: -0.1 * g, train)
    _, state = tx.update(updates, state, params, train_grads=train, dev_grads=dev)
    np.testing.assert_allclose(state.true_cosine, _hand_cosine(train, dev), rtol=1e-5)
    assert not np.allclose(state.true_cosine, state.cosine)  # a different statistic


def test_without_the_option_the_state_and_update_are_unchanged():
    params, train, dev = _tree(0), _tree(1), _tree(2)
    plain, recording = hacbo(LABELS, interval=1), hacbo(LABELS, interval=1, record_true_cosine=True)
    s0, s1 = plain.init(params), recording.init(params)
    assert s0.true_cosine is None
    updates = jax.tree.map(lambda g: -0.1 * g, train)  # the base optimiser's output
    u0, s0 = plain.update(updates, s0, params, train_grads=train, dev_grads=dev)
    u1, s1 = recording.update(updates, s1, params, train_grads=train, dev_grads=dev)
    chex.assert_trees_all_equal(u0, u1)
    chex.assert_trees_all_equal(s0, s1._replace(true_cosine=None))


def test_true_cosine_needs_the_dev_gradient_not_its_sign_sketch():
    params, train, dev = _tree(0), _tree(1), _tree(2)
    tx = hacbo(LABELS, interval=1, record_true_cosine=True)
    with pytest.raises(ValueError, match="needs the dev gradient itself"):
        sketch = dev_sign_sketch(dev)
        tx.update(dev, tx.init(params), params, train_grads=train, dev_grads=sketch)


def test_true_cosine_is_kept_between_measurements_and_works_jitted():
    params, train, dev = _tree(0), _tree(1), _tree(2)
    tx = optax.chain(optax.adam(0.1), hacbo(LABELS, interval=2, record_true_cosine=True))
    state = tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, train_grads=g, dev_grad_fn=lambda _: dev))
    _, state = update(train, state, params)  # t = 1: no measurement
    chex.assert_trees_all_equal(state[1].true_cosine, jnp.zeros(2))
    _, state = update(train, state, params)  # t = 2: measures
    np.testing.assert_allclose(state[1].true_cosine, _hand_cosine(train, dev), rtol=1e-5)


def test_the_option_must_be_a_flag():
    with pytest.raises(ValueError, match="record_true_cosine"):
        hacbo(LABELS, record_true_cosine="yes")
