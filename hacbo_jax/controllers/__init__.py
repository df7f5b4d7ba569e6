"""HACBO and BLAC as optax transformations (spec: shared/spec/controllers.md)."""

from hacbo_jax.controllers.blac import BLACState, blac, blac_multipliers
from hacbo_jax.controllers.compose import (
    accumulate_gradients,
    controlled_leaves,
    dev_sign_sketch,
    train_grads_from_updates,
)
from hacbo_jax.controllers.hacbo import HACBOState, hacbo, hacbo_multipliers
from hacbo_jax.controllers.labels import label_by_rules

__all__ = [
    "hacbo",
    "blac",
    "HACBOState",
    "BLACState",
    "hacbo_multipliers",
    "blac_multipliers",
    "label_by_rules",
    "accumulate_gradients",
    "train_grads_from_updates",
    "dev_sign_sketch",
    "controlled_leaves",
]
