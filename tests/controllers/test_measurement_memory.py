"""The measurement's statistics must not materialise full-size copies of the gradients.

XLA's CPU backend does not fuse an elementwise op into a reduction when the op has several
consumers: ``sign(g_train)`` feeding both the sign dot product and the non-zero count was kept
as a full f32 copy of every leaf, and ``isfinite`` as a full pred copy. On Qwen3-0.6B that
raised the HACBO measurement step's XLA temporaries from 3.01 GiB (ordinary step) to 6.49 GiB
. These tests compile one measurement update and read XLA's own memory
analysis (deterministic, no timing): the temporaries must stay below one leaf's size.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hacbo_jax import blac, hacbo

BLOCKS, ROWS, COLS = 8, 128, 512
LEAF_BYTES = BLOCKS * ROWS * COLS * 4  # one stacked f32 leaf: 2 MiB
LABELS = {"embed": "other", "layers": {"attn": "*/attn", "mlp": "*/mlp"}, "head": "0/mlp"}


def _abstract_tree():
    stacked = jax.ShapeDtypeStruct((BLOCKS, ROWS, COLS), jnp.float32)
    flat = jax.ShapeDtypeStruct((BLOCKS * ROWS, COLS), jnp.float32)  # one big unstacked leaf
    return {"embed": flat, "layers": {"attn": stacked, "mlp": stacked}, "head": flat}


@pytest.mark.parametrize("dev_form", ["fp32", "sketch"])
@pytest.mark.parametrize(
    "make",
    [lambda: hacbo(LABELS, interval=1), lambda: blac(LABELS, interval=1)],
    ids=["hacbo", "blac"],
)
def test_measurement_statistics_keep_no_full_size_temporaries(make, dev_form):
    """With the dev gradient as fp32 or as its 2-bit sign sketch (unpacked slice by slice)."""
    from hacbo_jax import dev_sign_sketch

    tx = make()
    tree = _abstract_tree()
    state = jax.eval_shape(tx.init, tree)
    dev = jax.eval_shape(dev_sign_sketch, tree) if dev_form == "sketch" else tree

    def measurement(updates, state, params, train, dev):
        return tx.update(updates, state, params, train_grads=train, dev_grads=dev)

    compiled = jax.jit(measurement).lower(tree, state, tree, tree, dev).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    # The updates (scaled, output) may need one leaf-sized buffer; the statistics need none.
    assert temp <= LEAF_BYTES, f"{temp / 2**20:.1f} MiB of XLA temporaries"


@pytest.mark.parametrize(
    "shape", [(), (5,), (3, 5), (3, 4, 5), (64, 1027), (2, 0)], ids=lambda s: "x".join(map(str, s))
)
def test_dev_sign_sketch_holds_two_bits_per_coordinate(shape):
    from hacbo_jax import dev_sign_sketch

    x = jnp.zeros(shape, jnp.float32)
    (packed,) = jax.tree.leaves(dev_sign_sketch([x]))
    rows = shape[0] if shape else 1
    per_row = math.prod(shape[1:])  # 1 for a scalar
    assert packed.dtype == jnp.uint8
    assert packed.shape == (rows, -(-per_row // 4))  # the leading (block) axis is kept


def test_a_sketch_is_finite_unless_a_coordinate_was_nan_or_inf():
    from hacbo_jax import dev_sign_sketch
    from hacbo_jax.controllers._groups import leaf_is_finite

    x = np.linspace(-1.0, 1.0, 3 * 7, dtype=np.float32).reshape(3, 7)
    x[1, 3] = 0.0
    assert bool(leaf_is_finite(dev_sign_sketch(x)))
    for pos in np.ndindex(x.shape):  # every position, padding boundary included
        for value in (np.nan, np.inf, -np.inf):
            bad = x.copy()
            bad[pos] = value
            assert not bool(leaf_is_finite(dev_sign_sketch(bad))), (pos, value)


def test_all_finite_sees_nan_and_inf_in_every_position():
    from hacbo_jax.controllers._groups import UNCONTROLLED, all_finite, resolve_layout

    tree = {
        "embed": np.ones((4, 3), np.float32),
        "layers": {"attn": np.ones((2, 3), np.float32), "mlp": np.ones((2, 3), np.float32)},
        "head": np.ones((4, 3), np.float32),
    }
    layout = resolve_layout(LABELS, tree, None, allow_stacked=True)
    leaves = layout.treedef.flatten_up_to(tree)
    assert bool(all_finite(layout, leaves))
    for i, leaf in enumerate(leaves):
        for value in (np.nan, np.inf, -np.inf):
            for pos in np.ndindex(leaf.shape):
                bad = list(leaves)
                bad[i] = leaf.copy()
                bad[i][pos] = value
                controlled = layout.leaf_block[i] != UNCONTROLLED
                assert bool(all_finite(layout, bad)) is not controlled, (i, pos, value)


@pytest.mark.parametrize("size", [12, 65_728, 2**20])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_leaf_is_finite_sees_a_bad_value_in_a_large_leaf(size, value):
    """XLA's CPU max-reduction drops NaN from arrays of 2^16 coordinates and more, so a
    finiteness check built on max|x| missed a NaN gradient of every real-sized leaf."""
    from hacbo_jax.controllers._groups import leaf_is_finite

    check = jax.jit(leaf_is_finite)
    x = np.ones(size, np.float32)
    assert bool(check(x))
    for pos in (0, size // 2, size - 1):
        bad = x.copy()
        bad[pos] = value
        assert not bool(check(bad)), pos
        assert not bool(check(bad.reshape(-1, 4))), pos


def _concrete_tree(seed, scale=1.0):
    k = jax.random.split(jax.random.key(seed), 4)
    return {
        "embed": scale * jax.random.normal(k[0], (16, 4)),
        "layers": {
            "attn": scale * jax.random.normal(k[1], (3, 4, 5)),
            "mlp": scale * jax.random.normal(k[2], (3, 5)),
        },
        # big enough to be reduced in chunks, rows not a multiple of the sketch's 4 per byte
        "head": scale * jax.random.normal(k[3], (64, 1027)),
    }


@pytest.mark.slow
@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "make",
    [
        lambda: hacbo(LABELS, interval=1, patience=1, theta_neg=0.3, rho=0.5),
        lambda: blac(LABELS, interval=1, freeze_after=2, rho=0.5),
    ],
    ids=["hacbo", "blac"],
)
def test_dev_sign_sketch_measures_exactly_as_the_dev_gradient(make, bad):
    from hacbo_jax import dev_sign_sketch

    tx = optax.chain(optax.adamw(1e-2), make())
    params = _concrete_tree(0)
    state_full = state_sketch = tx.init(params)
    update = jax.jit(
        lambda st, train, dev: tx.update(train, st, params, train_grads=train, dev_grads=dev)
    )
    for t in range(4):
        train = _concrete_tree(10 + t)
        # tiny values too: their signs must survive the sketch
        dev = _concrete_tree(100 + t, scale=1e-30 if t == 1 else 1.0)
        dev["layers"]["mlp"] = dev["layers"]["mlp"].at[1, 2].set(0.0)  # sign(0) = 0 kept
        if bad is not None and t == 2:
            dev["layers"]["attn"] = dev["layers"]["attn"].at[2, 1, 3].set(bad)
        if bad is not None and t == 3:
            dev["head"] = dev["head"].at[63, 1026].set(bad)
        sketch = dev_sign_sketch(dev)
        assert all(x.dtype == jnp.uint8 for x in jax.tree.leaves(sketch))
        out_full, state_full = update(state_full, train, dev)
        out_sketch, state_sketch = update(state_sketch, train, sketch)
        chex.assert_trees_all_equal(out_sketch, out_full)
        chex.assert_trees_all_equal(state_sketch, state_full)
    skipped = int(state_full[1].skipped_measurements)
    assert skipped == (0 if bad is None else 2)
