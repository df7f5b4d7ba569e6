"""hacbo-jax: budget-controlled full fine-tuning of language models in JAX."""

from hacbo_jax.autolrs import AutoLRSConfig, AutoLRSResult, AutoLRSState, autolrs_run
from hacbo_jax.controllers import (
    BLACState,
    HACBOState,
    accumulate_gradients,
    blac,
    blac_multipliers,
    controlled_leaves,
    dev_sign_sketch,
    hacbo,
    hacbo_multipliers,
    label_by_rules,
    train_grads_from_updates,
)
from hacbo_jax.controllers.adagradselect import (
    AdaGradSelectState,
    adagradselect,
    adagradselect_epsilon,
    adagradselect_num_selected,
    adagradselect_stats,
)

__all__ = [
    "hacbo",
    "blac",
    "adagradselect",
    "HACBOState",
    "BLACState",
    "AdaGradSelectState",
    "hacbo_multipliers",
    "blac_multipliers",
    "adagradselect_epsilon",
    "adagradselect_num_selected",
    "adagradselect_stats",
    "label_by_rules",
    "accumulate_gradients",
    "train_grads_from_updates",
    "dev_sign_sketch",
    "controlled_leaves",
    "autolrs_run",
    "AutoLRSConfig",
    "AutoLRSState",
    "AutoLRSResult",
]
