"""Typed, validated configuration of a fine-tuning run.

A run is described by one YAML file (``configs/*.yaml``, or its name; ``extends: NAME`` makes it
an overlay of another config: :func:`read_config_file`) plus dotted ``key=value`` overrides
from the command line (``optim.lr=1e-4 controller.hacbo.gamma=0.1``); override values are parsed
as YAML scalars (``null``, ``true``, ``3``, ``0.5``, ``[1, 2]``).  The result is a tree of frozen
dataclasses (:class:`Config`).  Everything is checked before any work starts: unknown keys,
wrong types, out-of-range values and inconsistent combinations are all collected and reported
in ONE :class:`ConfigError` that names each key, its value and what is allowed.

Controller hyper-parameters live in two sub-sections, ``controller.hacbo.*`` and
``controller.blac.*``; ``controller.kind`` picks the one in use (``none`` = plain AdamW), so a
single file can switch method with one override and both default sets stay documented.

Relative paths (``model.path``, ``data.train_file``, ``data.eval_file``) are looked up in the
current directory, then in the installed ``hacbo_jax`` package, and stored resolved (absolute) in the Config.
``output_dir`` is kept as written (relative to the current directory).
"""

from hacbo_jax.trainer.config.cli import parse_cli
from hacbo_jax.trainer.config.load import (
    CONFIGS_DIR,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    read_config_file,
    resolve_config_path,
    save_config,
    shipped_configs,
)
from hacbo_jax.trainer.config.schema import (
    BLACConfig,
    CheckpointConfig,
    ColumnsConfig,
    Config,
    ControllerConfig,
    DataConfig,
    DivergenceConfig,
    EvalConfig,
    HACBOConfig,
    LoggingConfig,
    MeshConfig,
    MicroDevConfig,
    ModelConfig,
    OptimConfig,
    SyntheticConfig,
)
from hacbo_jax.trainer.config.validate import (
    PACKAGE_ROOT,
    check_backend,
    check_mesh,
    check_pool_size,
    check_warmup,
)
from hacbo_jax.trainer.config_fields import ConfigError

__all__ = [
    "BLACConfig",
    "CONFIGS_DIR",
    "CheckpointConfig",
    "ColumnsConfig",
    "Config",
    "ConfigError",
    "ControllerConfig",
    "DataConfig",
    "DivergenceConfig",
    "EvalConfig",
    "HACBOConfig",
    "LoggingConfig",
    "MeshConfig",
    "MicroDevConfig",
    "ModelConfig",
    "OptimConfig",
    "PACKAGE_ROOT",
    "SyntheticConfig",
    "apply_overrides",
    "check_backend",
    "check_mesh",
    "check_pool_size",
    "check_warmup",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_cli",
    "read_config_file",
    "resolve_config_path",
    "save_config",
    "shipped_configs",
]
