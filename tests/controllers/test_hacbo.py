"""HACBO: one hand-computed test per rule of docs/algorithm.md (HACBO), plus input checks.

The trees are tiny: B blocks, sub-modules "a" and "b" with two coordinates each, and one
uncontrolled leaf "emb". Expected values are worked out by hand in each test (comments give the
arithmetic); the controller is called eagerly so each case is cheap.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hacbo_jax import HACBOState, hacbo, hacbo_multipliers
from support.toy_trees import ONES, block_values, labels_for, ones_updates, state, tree
from hacbo_jax.controllers._groups import fake_int8


def step(tx, st, train, dev, updates):
    return tx.update(updates, st, None, train_grads=train, dev_grads=dev)


# ---------------------------------------------------------------- measurement, steps 1-4


def test_sign_cosine_agreement_and_curvature_emas():
    tx = hacbo(labels_for(3), interval=1, rho=0.8)
    # block 0: signs gt (+,-,0,+), gd (+,+,0,-): dot = 1 - 1 - 1 = -1, |nnz| 3 and 3 -> -1/3
    # block 1: gt all zero -> cos = 0 (zero sign norm)
    # block 2: signs gt (+,+,+,+), gd (+,+,0,0): dot 2, norms 2 and sqrt 2 -> 1/sqrt 2
    train = tree([([1, -2], [0, 3]), ([0, 0], [0, 0]), (ONES, ONES)])
    dev = tree([([2, 5], [0, -1]), (ONES, ONES), ([3, 2], [0, 0])])
    st = tx.init(train)
    _, st = step(tx, st, train, dev, ones_updates(3))
    cos = np.array([-1 / 3, 0.0, 1 / math.sqrt(2)])
    np.testing.assert_allclose(st.cosine, cos, rtol=1e-6)
    np.testing.assert_allclose(st.agreement, 0.2 * np.maximum(cos, 0), rtol=1e-6)
    # RMS = ||g||_2 / sqrt(size): block 0 a: sqrt(5)/sqrt(2), b: 3/sqrt(2); block 2: 1 and 1
    rms = np.array([[math.sqrt(2.5), 3 / math.sqrt(2)], [0, 0], [1, 1]])
    np.testing.assert_allclose(st.curvature, 0.2 * rms, rtol=1e-6)
    np.testing.assert_allclose(st.layer_weights, [0, 0, 1], atol=1e-7)  # w = a / S

    updates, st = step(tx, st, train, dev, ones_updates(3))
    np.testing.assert_allclose(st.agreement, (0.8 * 0.2 + 0.2) * np.maximum(cos, 0), rtol=1e-6)
    np.testing.assert_allclose(st.curvature, (0.8 * 0.2 + 0.2) * rms, rtol=1e-6)
    assert st.count == 2
    # blocks 0 and 1 have a = 0 < theta_neg twice: z = 2; block 2 has a >= theta_neg: z = 0
    np.testing.assert_array_equal(st.neg_count, [2, 2, 0])
    assert not st.probation.any()
    # A block with a_b = 0 while S > 0 gets w_b = 0, hence no update, although not in probation;
    # block 2: L_active * w * v = 3 * 1 * 1/2.
    for b, expected in [(0, 0.0), (1, 0.0), (2, 1.5)]:
        np.testing.assert_allclose(block_values(updates, b), np.full((2, 2), expected), rtol=1e-6)
    np.testing.assert_array_equal(updates["emb"], [7.0, -7.0])


def test_l2_curvature_norm():
    tx = hacbo(labels_for(2), interval=1, rho=0.8, curvature_norm="l2")
    train = tree([([3, 4], [0, 1]), ([1, 1], [2, 2])])
    st = tx.init(train)
    _, st = step(tx, st, train, train, ones_updates(2))
    # ||(3,4)|| = 5, ||(0,1)|| = 1, ||(1,1)|| = sqrt 2, ||(2,2)|| = sqrt 8
    np.testing.assert_allclose(st.curvature, 0.2 * np.array([[5, 1], [2**0.5, 8**0.5]]), rtol=1e-6)


def test_measurement_only_every_interval_steps():
    tx = hacbo(labels_for(2), interval=3, rho=0.5)
    train = tree([(ONES, ONES)] * 2)
    st = tx.init(train)
    for t in (1, 2):
        _, st = step(tx, st, train, train, ones_updates(2))
        assert st.count == t
        np.testing.assert_array_equal(st.agreement, [0, 0])
    _, st = step(tx, st, train, train, ones_updates(2))
    np.testing.assert_allclose(st.agreement, [0.5, 0.5])  # t = 3: cos = 1, a = 0.5 * 1


def test_weights_kept_when_total_agreement_is_zero():
    tx = hacbo(labels_for(2), interval=1, theta_neg=0.0)
    train = tree([(ONES, ONES)] * 2)
    st = state(2, layer_weights=[0.3, 0.7])
    # opposite signs in block 0, zero dev gradient in block 1: both cosines <= 0, a stays 0
    updates, st = step(
        tx, st, train, tree([([-1, -1], [-1, -1]), ([0, 0], [0, 0])]), ones_updates(2)
    )
    np.testing.assert_allclose(st.agreement, [0, 0])
    np.testing.assert_allclose(st.layer_weights, [0.3, 0.7])
    # multiplier = L_active * w * v = 2 * w * 1/2 = w
    np.testing.assert_allclose(block_values(updates, 0), np.full((2, 2), 0.3), rtol=1e-6)
    np.testing.assert_allclose(block_values(updates, 1), np.full((2, 2), 0.7), rtol=1e-6)


# ---------------------------------------------------------------- multipliers, steps 5-7


def test_uniform_multipliers_at_start():
    tx = hacbo(labels_for(4), interval=5)
    params = ones_updates(4)
    np.testing.assert_allclose(hacbo_multipliers(tx.init(params)), np.full((4, 2), 0.5))


def test_curvature_weights_within_block():
    # u = 1 / (c + eps): c = (1, 3) -> u = (1, 1/3) -> v = (3/4, 1/4); L_active * w = 2 * 1/2
    st = state(2, curvature=[[1.0, 3.0], [2.0, 2.0]])
    np.testing.assert_allclose(hacbo_multipliers(st), [[0.75, 0.25], [0.5, 0.5]], rtol=1e-6)
    # ablation: v uniform 1/M whatever c is
    np.testing.assert_allclose(
        hacbo_multipliers(st, curvature_weighting=False), np.full((2, 2), 0.5)
    )


def test_l_active_scaling():
    st = state(2, probation=[True, False], layer_weights=[0.5, 0.5])
    # L_active = 1: multiplier = 1 * 0.5 * 0.5; without probation 2 * 0.5 * 0.5
    np.testing.assert_allclose(hacbo_multipliers(st), np.full((2, 2), 0.25))
    np.testing.assert_allclose(
        hacbo_multipliers(st._replace(probation=jnp.zeros(2, bool))), np.full((2, 2), 0.5)
    )


def test_debias_multipliers_count_measurements():
    c = np.array([[1.0, 3.0]])
    for count, n in [(1, 0), (3, 1), (4, 2)]:  # interval 2: n = count // 2 measurements
        st = HACBOState(
            jnp.int32(count),
            jnp.zeros(1),
            jnp.asarray(c, jnp.float32),
            jnp.zeros(1, jnp.int32),
            jnp.zeros(1, bool),
            jnp.ones(1),
            jnp.zeros(1),
        )
        divisor = 1.0 - 0.8**n if n else 1.0
        u = 1.0 / (c / divisor + 1.0)  # eps = 1 makes the debias visible
        np.testing.assert_allclose(
            hacbo_multipliers(st, eps=1.0, rho=0.8, debias=True, interval=2), u / u.sum(), rtol=1e-6
        )
        u_raw = 1.0 / (c + 1.0)
        np.testing.assert_allclose(
            hacbo_multipliers(st, eps=1.0, interval=2), u_raw / u_raw.sum(), rtol=1e-6
        )


def test_debias_changes_the_probation_test():
    # cos = 0.5 in both blocks (signs agree on 3 of 4): raw a = 0.2 * 0.5 = 0.1 < theta = 0.2,
    # debiased a = 0.1 / (1 - 0.8) = 0.5 >= theta.
    train = tree([(ONES, ONES)] * 2)
    dev = tree([(ONES, [1, -1])] * 2)
    # (patience 2: no probation yet, which cos > 0 would end and reset z at once)
    for debias, low in [(False, 1), (True, 0)]:
        tx = hacbo(labels_for(2), interval=1, rho=0.8, theta_neg=0.2, patience=2, debias=debias)
        _, st = step(tx, tx.init(train), train, dev, ones_updates(2))
        np.testing.assert_allclose(st.agreement, [0.1, 0.1], rtol=1e-6)  # stored EMA stays raw
        np.testing.assert_array_equal(st.neg_count, [low, low])


# ---------------------------------------------------------------- probation, steps 3, 8, 9


def test_fake_int8_is_exact():
    x = jnp.asarray([0.2, -1.0, 0.1, 0.75], jnp.float32)
    # s = 1 / 127: 25.4 -> 25, -127, 12.7 -> 13, 95.25 -> 95
    np.testing.assert_allclose(fake_int8(x), np.array([25, -127, 13, 95]) / 127, rtol=1e-6)
    np.testing.assert_array_equal(fake_int8(jnp.zeros(3)), np.zeros(3))


def _fake_int8_np(x):
    s = np.max(np.abs(x)) / 127
    return np.round(x / s) * s


@pytest.mark.slow
def test_probation_entry_exit_by_cosine_and_timing():
    gamma = 0.5
    tx = hacbo(labels_for(2), interval=1, rho=0.8, theta_neg=0.15, patience=2, gamma=gamma)
    train = tree([([2, 2], [2, 2]), (ONES, ONES)])
    st = tx.init(train)
    u0a, u0b = np.array([0.3, -1.0]), np.array([0.5, 0.25])
    updates_in = tree([(u0a, u0b), (ONES, ONES)])

    # t=1: cos = (0.5, 1): a = (0.1, 0.2), z = (1, 0); c = 0.2 * rms = (0.4, 0.2);
    # w = (1/3, 2/3), multiplier = 2 * w * 1/2.
    out, st = step(tx, st, train, tree([(ONES, [1, -1]), (ONES, ONES)]), updates_in)
    np.testing.assert_array_equal(st.neg_count, [1, 0])
    assert not st.probation.any()
    np.testing.assert_allclose(block_values(out, 0), [u0a / 3, u0b / 3], rtol=1e-6)

    # t=2: cos = (-1, 1): a = (0.08, 0.36), z0 = 2 >= F -> probation now, for this update.
    # c = (0.72, 0.36): block 0 is above the median 0.54 and cos0 < 0, so it stays.
    # w = (0.08, 0.36) / 0.44 = (2/11, 9/11); L_active = 1.
    out, st = step(tx, st, train, tree([([-2, -2], [-2, -2]), (ONES, ONES)]), updates_in)
    np.testing.assert_array_equal(st.probation, [True, False])
    np.testing.assert_array_equal(st.neg_count, [2, 0])
    m0, m1 = 1 * (2 / 11) * 0.5, 1 * (9 / 11) * 0.5
    np.testing.assert_allclose(block_values(out, 0)[0], gamma * _fake_int8_np(m0 * u0a), rtol=1e-5)
    np.testing.assert_allclose(block_values(out, 0)[1], gamma * _fake_int8_np(m0 * u0b), rtol=1e-5)
    np.testing.assert_allclose(block_values(out, 1), np.full((2, 2), m1), rtol=1e-6)

    # t=3: cos0 = 1: a = (0.264, 0.488), z0 = 0. The update still sees the probation
    # (L_active = 1, quantised), then the block leaves it because cos0 > 0.
    out, st = step(tx, st, train, train, updates_in)
    w = np.array([0.264, 0.488]) / 0.752
    np.testing.assert_allclose(
        block_values(out, 0)[0], gamma * _fake_int8_np(w[0] / 2 * u0a), rtol=1e-5
    )
    np.testing.assert_allclose(block_values(out, 1), np.full((2, 2), w[1] / 2), rtol=1e-5)
    np.testing.assert_array_equal(st.probation, [False, False])
    np.testing.assert_array_equal(st.neg_count, [0, 0])
    # the logged probation no longer shows it, the count of updates applied in probation does
    np.testing.assert_array_equal(st.probation_steps, [2, 0])

    # t=4: a = (0.4112, 0.5904); no probation: L_active = 2, multiplier = 2 * w / 2 = w.
    out, st = step(tx, st, train, train, updates_in)
    w = np.array([0.4112, 0.5904]) / 1.0016
    np.testing.assert_allclose(block_values(out, 0), [w[0] * u0a, w[0] * u0b], rtol=1e-5)
    np.testing.assert_array_equal(st.probation_steps, [2, 0])


def test_probation_entered_and_left_at_one_measurement_is_counted():
    """Entry and exit at the same measurement (z reaches F while cos > 0): the block's update of
    that step is in probation (gamma * fake_int8), the state after it is not; probation_steps
    counts the update, so a log of the state still shows that probation acted."""
    gamma = 0.5
    tx = hacbo(labels_for(2), interval=1, rho=0.8, theta_neg=0.5, patience=1, gamma=gamma)
    train = tree([([2, 2], [2, 2]), (ONES, ONES)])
    st = tx.init(train)
    np.testing.assert_array_equal(st.probation_steps, [0, 0])
    # cos = (1, 1): a = (0.2, 0.2) < 0.5 -> z = 1 = F: both enter; L_active = 0 -> the
    # multipliers are 0 and so is the update; cos > 0: both leave after it.
    out, st = step(tx, st, train, train, ones_updates(2))
    assert not st.probation.any()
    np.testing.assert_array_equal(st.probation_steps, [1, 1])
    np.testing.assert_array_equal(block_values(out, 0), np.zeros((2, 2)))


def test_probation_exit_by_low_curvature_and_gamma_zero_freezes():
    tx = hacbo(labels_for(2), interval=1, rho=0.8, gamma=0.0)
    st = state(
        2, agreement=[0.5, 0.5], neg_count=[6, 0], probation=[True, False], layer_weights=[0.5, 0.5]
    )
    train = tree([([0.5, 0.5], [0.5, 0.5]), (ONES, ONES)])
    dev = tree([([-1, -1], [-1, -1]), (ONES, ONES)])  # cos0 = -1: only curvature can free it
    out, st = step(tx, st, train, dev, ones_updates(2))
    # gamma = 0: the block in probation gets exactly no update at this step ...
    np.testing.assert_array_equal(block_values(out, 0), np.zeros((2, 2)))
    # a = 0.8 * 0.5 + 0.2 * (0, 1) = (0.4, 0.6) = w; block 1: L_active * w1 * v = 1 * 0.6 * 0.5
    np.testing.assert_allclose(block_values(out, 1), np.full((2, 2), 0.3), rtol=1e-6)
    np.testing.assert_array_equal(out["emb"], [7.0, -7.0])
    # ... and leaves probation after it: mean c = (0.1, 0.2), median 0.15, 0.1 < 0.15.
    np.testing.assert_allclose(st.curvature.mean(axis=1), [0.1, 0.2], rtol=1e-6)
    np.testing.assert_array_equal(st.probation, [False, False])
    np.testing.assert_array_equal(st.neg_count, [0, 0])


def test_probation_exit_only_on_measurement_steps():
    tx = hacbo(labels_for(2), interval=2)
    # the stored cosine is positive, but t = 1 is not a measurement step: no exit
    st = state(2, probation=[True, False], cosine=[0.9, 0.9], neg_count=[6, 0])
    train = tree([(ONES, ONES)] * 2)
    _, st = step(tx, st, train, train, ones_updates(2))
    np.testing.assert_array_equal(st.probation, [True, False])
    np.testing.assert_array_equal(st.neg_count, [6, 0])


def test_probation_ablation_never_enters():
    train = tree([(ONES, ONES)] * 2)
    dev = tree([([-1, -1], [-1, -1])] * 2)
    tx = hacbo(labels_for(2), interval=1, patience=1, probation=False)
    _, st = step(tx, tx.init(train), train, dev, ones_updates(2))
    np.testing.assert_array_equal(st.neg_count, [1, 1])
    assert not st.probation.any()


# ---------------------------------------------------------------- budget, step 10


def test_update_norm_budget_clips_whole_update_last():
    train = tree([(ONES, ONES)] * 2)
    updates = tree([([2, 0], [2, 0])] * 2, emb=(3.0, 4.0))
    # controlled leaves: multiplier 1/M = 1/2 -> (1, 0) each; norm^2 = 25 + 4 * 1 = 29
    tx = hacbo(labels_for(2), interval=5, update_norm_budget=1.0)
    out, _ = step(tx, tx.init(train), train, train, updates)
    k = 1 / math.sqrt(29)
    np.testing.assert_allclose(out["emb"], [3 * k, 4 * k], rtol=1e-6)
    np.testing.assert_allclose(block_values(out, 1), [[k, 0], [k, 0]], rtol=1e-6)
    tx = hacbo(labels_for(2), interval=5, update_norm_budget=10.0)  # under budget: unchanged
    out, _ = step(tx, tx.init(train), train, train, updates)
    np.testing.assert_allclose(out["emb"], [3, 4])
    np.testing.assert_allclose(block_values(out, 1), [[1, 0], [1, 0]])


# ---------------------------------------------------------------- dtype and inputs


def test_bf16_updates_keep_dtype_state_stays_float32():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), ones_updates(2))
    tx = hacbo(labels_for(2), interval=1)
    st = tx.init(params)
    out, st = jax.jit(lambda u, s: tx.update(u, s, train_grads=u, dev_grads=u))(params, st)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
    for field in ("agreement", "curvature", "layer_weights", "cosine"):
        assert getattr(st, field).dtype == jnp.float32


def test_dev_gradient_input_errors():
    # (omitting the dev gradient is no longer an error, see
    # test_controllers_issue12.py::test_omitted_dev_source_traces_no_measurement_and_counts_missed)
    params = ones_updates(2)
    tx = hacbo(labels_for(2), interval=3)
    st = tx.init(params)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, st, None, train_grads=params, dev_grad_fn=lambda p: p)
    with pytest.raises(ValueError, match="not both"):
        tx.update(params, st, params, train_grads=params, dev_grads=params, dev_grad_fn=lambda p: p)
    with pytest.raises(ValueError, match="train_grads"):
        tx.update(params, st, params, dev_grads=params)


@pytest.mark.parametrize(
    "labels, message",
    [
        (
            {"emb": "other", "blocks": [{"a": "0/a", "b": "0/b"}, {"a": "2/a", "b": "2/b"}]},
            "0..B-1",
        ),
        ({"emb": "other", "blocks": [{"a": "0/a", "b": "0/b"}, {"a": "1/a", "b": 3}]}, "strings"),
        (
            {"emb": "other", "blocks": [{"a": "0/a", "b": "0/b"}, {"a": "1/a", "b": "other"}]},
            "every sub-module",
        ),
        ({"emb": "other", "blocks": [{"a": "other", "b": "other"}] * 2}, "nothing to control"),
    ],
)
def test_bad_labels_raise(labels, message):
    params = ones_updates(2)
    with pytest.raises(ValueError, match=message):
        tx = hacbo(labels, interval=1)
        tx.update(params, tx.init(params), params, train_grads=params, dev_grads=params)


def test_explicit_submodule_order_and_unknown_submodule():
    params = ones_updates(2)
    tx = hacbo(labels_for(2), interval=1, submodules=("b", "a"))
    train = tree([([3, 3], ONES)] * 2)  # rms of "a" = 3, of "b" = 1; columns are (b, a)
    _, st = tx.update(params, tx.init(params), params, train_grads=train, dev_grads=train)
    np.testing.assert_allclose(st.curvature, 0.2 * np.array([[1, 3], [1, 3]]), rtol=1e-6)
    with pytest.raises(ValueError, match="submodules"):
        hacbo(labels_for(2), submodules=("a",)).init(params)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rho=1.0),
        dict(interval=0),
        dict(patience=0),
        dict(curvature_norm="linf"),
        dict(gamma=-1.0),
        dict(update_norm_budget=0.0),
    ],
)
def test_bad_hyperparameters_raise(kwargs):
    with pytest.raises(ValueError):
        hacbo(labels_for(2), **kwargs)
