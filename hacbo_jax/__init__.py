"""hacbo-jax: budget-controlled fine-tuning of language models in JAX.

The top level is the optax transformations and their helpers; it needs only jax, optax and
numpy. The rest of the package is organised by concern and pulls in its own dependencies:

- :mod:`hacbo_jax.controllers`: HACBO, BLAC and AdaGradSelect (this namespace re-exports them).
- :mod:`hacbo_jax.models`: the Flax NNX Qwen3 / Qwen2 / Llama 3 port (extra ``models``).
- :mod:`hacbo_jax.data`: GSM8K and other formats, synthetic tasks, packing, the micro-dev
  buffer, the tokenizer (extra ``train``).
- :mod:`hacbo_jax.trainer`: config, jitted step, loop, checkpoints, logs, sharding (extra
  ``train``).
- :mod:`hacbo_jax.experiments`: compare, sweep, evidence, AutoLRS, curvature probe, lr·wd sweep
  (extra ``research``).

The algorithms are defined in ``docs/algorithm.md``.
"""

from hacbo_jax.controllers import (
    AdaGradSelectState,
    BLACState,
    HACBOState,
    accumulate_gradients,
    adagradselect,
    adagradselect_epsilon,
    adagradselect_num_selected,
    adagradselect_stats,
    blac,
    blac_multipliers,
    controlled_leaves,
    dev_sign_sketch,
    hacbo,
    hacbo_multipliers,
    hacbo_starvation,
    hacbo_submodule_shares,
    label_by_rules,
    outside_controllers,
    train_grads_from_updates,
)

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
    "label_by_rules",
    "accumulate_gradients",
    "train_grads_from_updates",
    "dev_sign_sketch",
    "controlled_leaves",
    "outside_controllers",
]
