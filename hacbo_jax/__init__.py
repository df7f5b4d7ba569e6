"""hacbo-jax: budget-controlled full fine-tuning of language models in JAX."""

from hacbo_jax.controllers import (
    BLACState,
    HACBOState,
    accumulate_gradients,
    blac,
    blac_multipliers,
    hacbo,
    hacbo_multipliers,
    label_by_rules,
    train_grads_from_updates,
)

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
]
