"""HACBO, BLAC and AdaGradSelect as optax transformations, chained after a base optimiser.

Each transformation reads a label tree (one label per parameter, ``"other"`` = not controlled)
and rescales the base optimiser's updates per block. Only jax, optax and numpy are needed.
The algorithms, every hyper-parameter and the readings chosen are in ``docs/algorithm.md``.
"""

from hacbo_jax.controllers.adagradselect import (
    AdaGradSelectState,
    adagradselect,
    adagradselect_epsilon,
    adagradselect_idle_units,
    adagradselect_num_selected,
    adagradselect_stats,
)
from hacbo_jax.controllers.blac import BLACState, blac, blac_idle_blocks, blac_multipliers
from hacbo_jax.controllers.compose import (
    accumulate_gradients,
    controlled_leaves,
    dev_sign_sketch,
    outside_controllers,
    train_grads_from_updates,
    zero_blocks,
)
from hacbo_jax.controllers.hacbo import (
    HACBOState,
    hacbo,
    hacbo_idle_blocks,
    hacbo_multipliers,
    hacbo_starvation,
    hacbo_submodule_shares,
)
from hacbo_jax.controllers.labels import label_by_rules

__all__ = [
    "hacbo",
    "blac",
    "adagradselect",
    "HACBOState",
    "BLACState",
    "AdaGradSelectState",
    "hacbo_multipliers",
    "hacbo_submodule_shares",
    "hacbo_starvation",
    "blac_multipliers",
    "adagradselect_epsilon",
    "adagradselect_num_selected",
    "adagradselect_stats",
    "adagradselect_idle_units",
    "blac_idle_blocks",
    "hacbo_idle_blocks",
    "zero_blocks",
    "label_by_rules",
    "accumulate_gradients",
    "train_grads_from_updates",
    "dev_sign_sketch",
    "controlled_leaves",
    "outside_controllers",
]
