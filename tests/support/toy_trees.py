"""Tiny label and update trees for the controllers' hand-computed tests.

B blocks, sub-modules "a" and "b" with two coordinates each, and one uncontrolled leaf "emb".
"""

import jax.numpy as jnp
import numpy as np

from hacbo_jax import HACBOState


def labels_for(num_blocks):
    return {"emb": "other", "blocks": [{"a": f"{b}/a", "b": f"{b}/b"} for b in range(num_blocks)]}


def tree(blocks, emb=(0.0, 0.0)):
    """blocks: [(a_values, b_values)] per block."""
    return {
        "emb": jnp.asarray(emb, jnp.float32),
        "blocks": [
            {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)} for a, b in blocks
        ],
    }


ONES = [1.0, 1.0]


def ones_updates(num_blocks, emb=(7.0, -7.0)):
    return tree([(ONES, ONES)] * num_blocks, emb)


def block_values(updates, b):
    return (np.asarray(updates["blocks"][b]["a"]), np.asarray(updates["blocks"][b]["b"]))


def state(num_blocks, **fields):
    base = dict(
        count=jnp.int32(0),
        agreement=jnp.zeros(num_blocks),
        curvature=jnp.zeros((num_blocks, 2)),
        neg_count=jnp.zeros(num_blocks, jnp.int32),
        probation=jnp.zeros(num_blocks, bool),
        layer_weights=jnp.full(num_blocks, 1.0 / num_blocks),
        cosine=jnp.zeros(num_blocks),
    )
    base.update({k: jnp.asarray(v, base[k].dtype) for k, v in fields.items()})
    return HACBOState(**base)
