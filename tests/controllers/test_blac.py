"""BLAC: hand-computed warm-up, irreversible freezing and re-normalised weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hacbo_jax import BLACState, blac, blac_multipliers, hacbo

LABELS = {"emb": "other", "blocks": [{"a": f"{b}/a", "b": f"{b}/b"} for b in range(3)]}
ONES = [1.0, 1.0]


def tree(blocks, emb=(7.0, -7.0)):
    return {
        "emb": jnp.asarray(emb, jnp.float32),
        "blocks": [
            {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)} for a, b in blocks
        ],
    }


TRAIN = tree([(ONES, ONES)] * 3)
AGREE = (ONES, ONES)  # cos = 1
HALF = (ONES, [1, -1])  # signs agree on 3 of 4: cos = 2 / 4 = 0.5
OPPOSE = ([-1, -1], [-1, -1])  # cos = -1


def test_warm_up_irreversible_freezing_and_renormalised_weights():
    tx = blac(LABELS, interval=1, rho=0.5, freeze_after=3)
    st = tx.init(TRAIN)
    # block 0 cos: 0.5, -1, -1, 1; block 1 cos: 1 always; block 2 cos: 0.5 always.
    schedule = [HALF, OPPOSE, OPPOSE, AGREE]
    expected = [
        # (a, s, frozen, multipliers); a <- a/2 + max(0, cos)/2, s <- s/2 + cos/2
        # t=1: a = (.25, .5, .25), S = 1, w = a, multiplier = 3 w
        ([0.25, 0.5, 0.25], [0.25, 0.5, 0.25], [False] * 3, [0.75, 1.5, 0.75]),
        # t=2: s0 = -.375 < 0 but t < U = 3: warm-up, no freezing. S = 1.25, w = (.1, .6, .3)
        ([0.125, 0.75, 0.375], [-0.375, 0.75, 0.375], [False] * 3, [0.3, 1.8, 0.9]),
        # t=3 >= U and s0 = -.6875 < 0: block 0 frozen. S over the others = .875 + .4375,
        # w = (0, 2/3, 1/3), L_active = 2
        (
            [0.0625, 0.875, 0.4375],
            [-0.6875, 0.875, 0.4375],
            [True, False, False],
            [0, 4 / 3, 2 / 3],
        ),
        # t=4: cos0 = 1 makes s0 = .15625 > 0 and a0 > 0, yet block 0 stays frozen, w0 = 0
        (
            [0.53125, 0.9375, 0.46875],
            [0.15625, 0.9375, 0.46875],
            [True, False, False],
            [0, 4 / 3, 2 / 3],
        ),
    ]
    for block0_dev, (a, s, frozen, multipliers) in zip(schedule, expected):
        dev = tree([block0_dev, AGREE, HALF])
        out, st = tx.update(tree([(ONES, ONES)] * 3), st, None, train_grads=TRAIN, dev_grads=dev)
        np.testing.assert_allclose(st.agreement, a, rtol=1e-6)
        np.testing.assert_allclose(st.signed_agreement, s, rtol=1e-6)
        np.testing.assert_array_equal(st.frozen, frozen)
        np.testing.assert_allclose(blac_multipliers(st), multipliers, rtol=1e-6)
        for b in range(3):  # every sub-module of block b gets multiplier_b
            np.testing.assert_allclose(out["blocks"][b]["a"], [multipliers[b]] * 2, rtol=1e-6)
            np.testing.assert_allclose(out["blocks"][b]["b"], [multipliers[b]] * 2, rtol=1e-6)
        np.testing.assert_array_equal(out["emb"], [7.0, -7.0])  # uncontrolled: untouched
    assert st.frozen.dtype == jnp.bool_ and st.agreement.dtype == jnp.float32


def test_weights_kept_when_no_agreement_and_budget():
    st = BLACState(
        jnp.int32(0),
        jnp.zeros(3),
        jnp.zeros(3),
        jnp.zeros(3, bool),
        jnp.asarray([0.2, 0.3, 0.5]),
        jnp.zeros(3),
    )
    tx = blac(LABELS, interval=1, update_norm_budget=1.0)
    dev = tree([OPPOSE] * 3)
    updates = tree([([0.5, 0], [0, 0])] * 3, emb=(0.0, 0.0))
    out, st = tx.update(updates, st, None, train_grads=TRAIN, dev_grads=dev)
    np.testing.assert_allclose(st.layer_weights, [0.2, 0.3, 0.5])  # S = 0: w kept
    # multipliers 3 w = (.6, .9, 1.5): leaves (.3, 0), (.45, 0), (.75, 0); norm^2 = .8550 < 1
    np.testing.assert_allclose(
        [out["blocks"][b]["a"][0] for b in range(3)], [0.3, 0.45, 0.75], rtol=1e-6
    )
    updates = tree([([1.0, 0], [0, 0])] * 3, emb=(0.0, 0.0))  # norm^2 = 3.42 > 1: clipped
    out, _ = tx.update(updates, st, None, train_grads=TRAIN, dev_grads=dev)
    np.testing.assert_allclose(
        [out["blocks"][b]["a"][0] for b in range(3)],
        np.array([0.6, 0.9, 1.5]) / np.sqrt(3.42),
        rtol=1e-6,
    )


def test_blac_rejects_bad_input():
    with pytest.raises(ValueError, match="freeze_after"):
        blac(LABELS, freeze_after=-1)
    tx = blac(LABELS, interval=1)
    with pytest.raises(ValueError, match="dev_grad_fn needs the params"):
        tx.update(TRAIN, tx.init(TRAIN), None, train_grads=TRAIN, dev_grad_fn=lambda p: p)


@pytest.mark.parametrize("make", [blac, hacbo], ids=["blac", "hacbo"])
def test_state_survives_a_donating_jitted_step(make):
    """init must give every state field its own buffer: a train step that donates its state
    (as hacbo_jax.trainer.step does) otherwise fails with 'Attempt to donate the same buffer twice'."""
    tx = make(LABELS, interval=1)
    state = tx.init(TRAIN)

    def step(state):
        return tx.update(
            tree([(ONES, ONES)] * 3), state, None, train_grads=TRAIN, dev_grads=tree([AGREE] * 3)
        )[1]

    donating = jax.jit(step, donate_argnums=0)
    for _ in range(2):
        state = donating(state)
    assert int(state.count) == 2
