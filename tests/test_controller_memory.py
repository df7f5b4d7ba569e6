"""The measurement's statistics must not materialise full-size copies of the gradients.

XLA's CPU backend does not fuse an elementwise op into a reduction when the op has several
consumers: ``sign(g_train)`` feeding both the sign dot product and the non-zero count was kept
as a full f32 copy of every leaf, and ``isfinite`` as a full pred copy. On Qwen3-0.6B that
raised the HACBO measurement step's XLA temporaries from 3.01 GiB (ordinary step) to 6.49 GiB
(issue 10, goal 2). These tests compile one measurement update and read XLA's own memory
analysis (deterministic, no timing): the temporaries must stay below one leaf's size.
"""

from __future__ import annotations

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


@pytest.mark.parametrize(
    "make",
    [lambda: hacbo(LABELS, interval=1), lambda: blac(LABELS, interval=1)],
    ids=["hacbo", "blac"],
)
def test_measurement_statistics_keep_no_full_size_temporaries(make):
    tx = make()
    tree = _abstract_tree()
    state = jax.eval_shape(tx.init, tree)

    def measurement(updates, state, params, train, dev):
        return tx.update(updates, state, params, train_grads=train, dev_grads=dev)

    compiled = jax.jit(measurement).lower(tree, state, tree, tree, tree).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    # The updates (scaled, output) may need one leaf-sized buffer; the statistics need none.
    assert temp <= LEAF_BYTES, f"{temp / 2**20:.1f} MiB of XLA temporaries"


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
