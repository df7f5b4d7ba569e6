"""Typed, validated configuration of a fine-tuning run.

A run is described by one YAML file (``configs/*.yaml``) plus dotted ``key=value`` overrides
from the command line (``optim.lr=1e-4 controller.hacbo.gamma=0.1``); override values are parsed
as YAML scalars (``null``, ``true``, ``3``, ``0.5``, ``[1, 2]``).  The result is a tree of frozen
dataclasses (:class:`Config`).  Everything is checked before any work starts: unknown keys,
wrong types, out-of-range values and inconsistent combinations are all collected and reported
in ONE :class:`ConfigError` that names each key, its value and what is allowed.

Controller hyper-parameters live in two sub-sections, ``controller.hacbo.*`` and
``controller.blac.*``; ``controller.kind`` picks the one in use (``none`` = plain AdamW), so a
single file can switch method with one override and both default sets stay documented.

Relative paths (``model.path``, ``data.train_file``, ``data.eval_file``) are looked up in the
current directory, then in the project root, and stored resolved (absolute) in the Config.
``output_dir`` is kept as written (relative to the current directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import yaml

from hacbo_jax.training.config_fields import (
    ConfigError,
    in_range,
    mesh_size_check,
    option,
)
from hacbo_jax.training.controller_registry import (
    CONTROLLERS,
    BLACConfig as BLACConfig,  # re-exported: the sections of ControllerConfig
    HACBOConfig as HACBOConfig,
    build_controller,
)

# Relative paths in a config are looked up in the current directory, then here: the installed
# package, so that the defaults ("assets/tiny-qwen3-gsm", "assets/gsm8k/...") are package data.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = PACKAGE_ROOT / "configs"


# ---------------------------------------------------------------------------------------------
# The schema.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """The base model: a local Hugging Face directory (with config.json) or a hub id."""

    path: str = "assets/tiny-qwen3-gsm"
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # master weights
    remat: bool = False  # gradient checkpointing
    # Vocabulary projection + cross-entropy this many positions at a time (the [T, V] logits
    # never exist at once); null = all positions together.
    logits_chunk: Optional[int] = option(None, in_range(1))


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic GSM8K-format task (presets are defined in train/synthetic.py)."""

    preset: str = "easy"
    n_train: int = option(4096, in_range(1))
    n_eval: int = option(256, in_range(1))
    seed: int = option(0, in_range(0))


@dataclass(frozen=True)
class DataConfig:
    task: Literal["gsm8k", "synthetic"] = "gsm8k"
    train_file: str = "assets/gsm8k/train.jsonl"
    eval_file: str = "assets/gsm8k/test.jsonl"
    hub_name: Optional[str] = None  # a datasets hub name used instead of the files
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    max_len: int = option(512, in_range(8))
    # Micro-dev pool size when microdev.pool is 'heldout'. gsm8k: train rows held out (never
    # trained on; 7,473 - 1,473 = 6,000 remain); synthetic: problems drawn from the task's
    # separate 'pool' stream (n_train is not reduced).
    heldout_size: int = option(1473, in_range(0))


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to zero over the run."""

    lr: float = option(1e-4, in_range(0, lo_open=True))
    b1: float = option(0.9, in_range(0, 1, hi_open=True))
    b2: float = option(0.95, in_range(0, 1, hi_open=True))
    weight_decay: float = option(0.1, in_range(0))
    clip_norm: Optional[float] = option(1.0, in_range(0, lo_open=True))  # null = no clipping
    warmup_steps: int = option(0, in_range(0))
    epochs: int = option(1, in_range(1))
    batch_size: int = option(64, in_range(1))  # global, examples per optimiser step
    micro_batch_size: Optional[int] = option(
        None, in_range(1)
    )  # null = batch_size (no accumulation)
    max_steps: Optional[int] = option(None, in_range(1))  # cap for quick runs

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimiser step."""
        return self.batch_size // (self.micro_batch_size or self.batch_size)


def _controller_config_type() -> type:
    """``ControllerConfig``: ``kind`` plus one section per registered controller
    (:data:`hacbo_jax.training.controller_registry.CONTROLLERS`)."""
    kinds = tuple(CONTROLLERS)
    sections = [
        (kind, entry.config_type, field(default_factory=entry.config_type))
        for kind, entry in CONTROLLERS.items()
        if entry.config_type is not None
    ]

    def interval(self) -> int | None:
        """Measurement interval K of the active controller (None for plain AdamW)."""
        hyper = self.hyper
        return None if hyper is None else hyper.interval

    def hyper(self) -> Any:
        """The active controller's section (None for ``kind: none``)."""
        return getattr(self, self.kind, None)

    def build(self, labels: Any) -> Any:
        """The active controller's optax transformation over ``labels`` (None for ``none``)."""
        return build_controller(self.kind, labels, self.hyper)

    return dataclasses.make_dataclass(
        "ControllerConfig",
        [("kind", Literal[kinds], field(default="hacbo")), *sections],
        namespace={
            "interval": property(interval),
            "hyper": property(hyper),
            "build": build,
            "__module__": __name__,
            "__doc__": "Which controller runs (``kind``) and every controller's section.",
        },
        frozen=True,
    )


ControllerConfig = _controller_config_type()


@dataclass(frozen=True)
class MicroDevConfig:
    size: int = option(1024, in_range(1))  # N_dev
    pool: Literal["heldout", "test"] = "heldout"
    refresh_every: int = option(500, in_range(0))  # R; 0 = never refresh
    refresh_fraction: float = option(0.25, in_range(0, 1))  # r
    batch_size: int = option(64, in_range(1))  # examples per dev gradient
    max_candidates: Optional[int] = option(
        256, in_range(1)
    )  # pool items scored per refresh; null = all


@dataclass(frozen=True)
class EvalConfig:
    limit: Optional[int] = option(None, in_range(1))  # null = full split
    max_new_tokens: int = option(256, in_range(1))
    batch_size: int = option(64, in_range(1))
    every_epoch: bool = True
    at_start: bool = False  # also evaluate the base model (step 0)


@dataclass(frozen=True)
class LoggingConfig:
    every: int = option(10, in_range(1))
    tensorboard: bool = False
    wandb: bool = False  # always offline


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = option(100, in_range(0))  # steps; 0 = only at the end
    keep: int = option(2, in_range(1))
    export_hf: bool = True  # RUN_DIR/hf_model at the end


@dataclass(frozen=True)
class DivergenceConfig:
    max_consecutive_nonfinite: int = option(5, in_range(1))


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh ("data", "fsdp"): data-parallel size (-1 = all devices) x FSDP shards.

    Checked against the devices present by train.finetune.make_run_mesh (hacbo_jax.sharding).
    """

    data: int = option(1, mesh_size_check)
    fsdp: int = option(1, in_range(1))


@dataclass(frozen=True)
class Config:
    output_dir: Optional[str] = None  # null = runs/<config file stem>
    seed: int = option(0, in_range(0))
    method: Optional[str] = None  # name in comparisons; null = controller.kind
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)  # type: ignore[valid-type]
    microdev: MicroDevConfig = field(default_factory=MicroDevConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    # -- step arithmetic ------------------------------------------------------------------
    def steps_per_epoch(self, n_train: int) -> int:
        """Optimiser steps per epoch over ``n_train`` examples: ``n_train // batch_size``.

        The incomplete last batch is dropped (fixed shapes), as ``train.data``'s sampler does.
        """
        return n_train // self.optim.batch_size

    def total_steps(self, n_train: int) -> int:
        """Optimiser steps of the whole run: epochs x steps per epoch, capped by max_steps."""
        steps = self.optim.epochs * self.steps_per_epoch(n_train)
        return min(steps, self.optim.max_steps) if self.optim.max_steps else steps

    def check_warmup(self, total_steps: int) -> None:
        """Raise ConfigError unless ``optim.warmup_steps < total_steps``."""
        if self.optim.warmup_steps >= total_steps:
            raise ConfigError(
                f"invalid config:\n  - optim.warmup_steps = {self.optim.warmup_steps}: must be "
                f"< the run's {total_steps} optimiser steps (epochs x (train examples // "
                f"batch_size), capped by max_steps); the learning rate would never leave warm-up"
            )

    def expected_train_examples(self) -> int | None:
        """Training examples the run will see, when knowable from the config alone.

        synthetic: ``n_train`` (its micro-dev pool is a separate generated stream).
        gsm8k: rows of ``data.train_file`` minus ``data.heldout_size`` when the micro-dev pool is
        the held-out slice; None with ``hub_name`` (size unknown until loaded).
        """
        if self.data.task == "synthetic":
            return self.data.synthetic.n_train
        if self.data.hub_name is None and Path(self.data.train_file).is_file():
            with open(self.data.train_file, "rb") as f:
                rows = sum(1 for line in f if line.strip())
        else:
            return None
        return rows - (self.data.heldout_size if self.microdev.pool == "heldout" else 0)


# ---------------------------------------------------------------------------------------------
# Building: dict -> dataclasses, with type checks.
# ---------------------------------------------------------------------------------------------

_MISSING = object()


def _describe_type(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_describe_type(a) for a in inner) + " or null"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {int: "an int", float: "a number", bool: "true/false", str: "a non-empty string"}.get(
        tp, str(tp)
    )


def _coerce(value: Any, tp) -> Any:
    """Return ``value`` as type ``tp``, or raise TypeError (message = what is allowed)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        try:
            return _coerce(value, inner[0])
        except TypeError:
            raise TypeError(_describe_type(tp)) from None
    if origin is Literal:
        if value in typing.get_args(tp) and isinstance(value, str):
            return value
        raise TypeError(_describe_type(tp))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number it means.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str) and value:
            return value
    raise TypeError(_describe_type(tp))


def _fmt(value: Any) -> str:
    return (
        repr(value)
        if isinstance(value, str)
        else yaml.safe_dump(value, default_flow_style=True, width=10**6)
        .strip()
        .removesuffix("...")
        .strip()
    )


def _build(cls, raw: Any, prefix: str, problems: list[str], bad: set[str]):
    """Build dataclass ``cls`` from ``raw``; problems are appended, rejected keys added to ``bad``
    (their defaults are used so that the remaining checks can still run)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append(
            f"{prefix.rstrip('.') or '<top level>'} = {_fmt(raw)}: must be {_describe_type(cls)}"
        )
        bad.add(prefix.rstrip("."))
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            problems.append(
                f"{prefix}{key}: unknown key{hint}; allowed keys here: " + ", ".join(names)
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = prefix + f.name
        if f.name not in raw:
            continue
        value = raw[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value, name + ".", problems, bad)
            continue
        try:
            coerced = _coerce(value, tp)
        except TypeError as e:
            problems.append(f"{name} = {_fmt(value)}: must be {e}")
            bad.add(name)
            continue
        check = f.metadata.get("check")
        why = check(coerced) if check else None
        if why:
            problems.append(f"{name} = {_fmt(value)}: must be {why}")
            bad.add(name)
            continue
        kwargs[f.name] = coerced
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Overrides, paths and cross-field rules.
# ---------------------------------------------------------------------------------------------


def apply_overrides(raw: dict, overrides: Sequence[str], problems: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(
                f"override {item!r}: must look like section.key=value (e.g. optim.lr=1e-4)"
            )
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text  # not YAML: take it as a plain string
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {} if child is None else child
                if not isinstance(child, dict):
                    problems.append(f"override {item!r}: {part!r} is not a section")
                    break
                node[part] = child
            node = child
        else:
            node[parts[-1]] = value
    return raw


def _resolve_existing(path: str) -> Path | None:
    """The path as given (from the current directory), else under the project root, if it exists."""
    p = Path(path).expanduser()
    for candidate in (p, PACKAGE_ROOT / p) if not p.is_absolute() else (p,):
        if candidate.exists():
            return candidate.resolve()
    return None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_local_path(path: str) -> bool:
    """``org/name`` is a hub id unless ``org`` is a local directory (e.g. ``assets/...``)."""
    if not _HUB_ID.match(path):
        return True
    first = path.split("/", 1)[0]
    return Path(first).is_dir() or (PACKAGE_ROOT / first).is_dir()


def _resolve_paths(cfg: Config, problems: list[str], bad: set[str]) -> Config:
    model_path = cfg.model.path
    if "model.path" not in bad:
        found = _resolve_existing(model_path)
        if found is not None:
            if not (found / "config.json").is_file():
                problems.append(
                    f"model.path = {model_path!r}: must be a Hugging Face model "
                    f"directory containing config.json (looked in {found}), or a hub id"
                )
            model_path = str(found)
        elif _looks_like_local_path(model_path):
            problems.append(
                f"model.path = {model_path!r}: no such local directory (looked in the "
                f"current directory and {PACKAGE_ROOT}); must be an existing Hugging "
                "Face model directory or a hub id like 'Qwen/Qwen3-0.6B'"
            )
    data = cfg.data
    files = {}
    if data.task == "gsm8k" and data.hub_name is None and not {"data.task", "data.hub_name"} & bad:
        for key in ("train_file", "eval_file"):
            given = getattr(data, key)
            found = _resolve_existing(given)
            if found is None or not found.is_file():
                problems.append(
                    f"data.{key} = {given!r}: file not found (looked in the current "
                    f"directory and {PACKAGE_ROOT}); must be a JSONL file of "
                    "{question, answer} rows, or set data.hub_name"
                )
                bad.add(f"data.{key}")
            else:
                files[key] = str(found)
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, path=model_path),
        data=dataclasses.replace(data, **files),
    )


def _check_synthetic_preset(preset: str) -> str | None:
    """Validate against train.synthetic.PRESETS when that module provides it."""
    try:
        from hacbo_jax.training import synthetic  # owned by the data engineer
    except ImportError:
        return None
    presets = getattr(synthetic, "PRESETS", None)
    if presets is None or preset in presets:
        return None
    return f"data.synthetic.preset = {preset!r}: must be one of " + ", ".join(map(repr, presets))


def _cross_checks(cfg: Config, problems: list[str], bad: set[str]) -> None:
    """Rules tying several keys together; a rule is skipped when one of its keys was rejected."""

    def ok(*keys: str) -> bool:
        return not any(
            k == b or k.startswith(b + ".") or b.startswith(k + ".") for k in keys for b in bad
        )

    o, m, d = cfg.optim, cfg.microdev, cfg.data
    if (
        ok("optim.batch_size", "optim.micro_batch_size")
        and o.micro_batch_size is not None
        and o.batch_size % o.micro_batch_size
    ):
        problems.append(
            f"optim.batch_size = {o.batch_size}: must be a multiple of "
            f"optim.micro_batch_size = {o.micro_batch_size} (gradient accumulation)"
        )
    warmup_ok = ok("optim.warmup_steps", "optim.max_steps")
    if warmup_ok and o.max_steps is not None and o.warmup_steps >= o.max_steps:
        problems.append(
            f"optim.warmup_steps = {o.warmup_steps}: must be < optim.max_steps = {o.max_steps}"
        )
        warmup_ok = False
    if ok("microdev.batch_size", "microdev.size") and m.batch_size > m.size:
        problems.append(
            f"microdev.batch_size = {m.batch_size}: must be <= microdev.size = {m.size}"
        )
    if (
        ok("microdev.pool", "microdev.size", "data.heldout_size")
        and m.pool == "heldout"
        and d.heldout_size < m.size
    ):
        problems.append(
            f"data.heldout_size = {d.heldout_size}: must be >= microdev.size = "
            f"{m.size} when microdev.pool is 'heldout' (the buffer is drawn from it)"
        )
    if d.task == "synthetic" and ok("data.task", "data.synthetic.preset"):
        why = _check_synthetic_preset(d.synthetic.preset)
        if why:
            problems.append(why)
    if not ok(
        "data.task",
        "data.train_file",
        "data.hub_name",
        "data.heldout_size",
        "data.synthetic.n_train",
        "microdev.pool",
        "optim.epochs",
        "optim.batch_size",
    ):
        return
    n_train = cfg.expected_train_examples()
    if n_train is None:
        return  # unknown until the data is loaded: the training loop calls check_warmup
    if n_train < o.batch_size:
        what = (
            "data.synthetic.n_train"
            if d.task == "synthetic"
            else f"the {n_train + d.heldout_size} rows of data.train_file minus data.heldout_size"
            if m.pool == "heldout"
            else "the rows of data.train_file"
        )
        problems.append(
            f"optim.batch_size = {o.batch_size}: must be <= the {n_train} training "
            f"examples ({what}); an epoch would have no full batch"
        )
    elif warmup_ok:
        total = cfg.total_steps(n_train)
        if o.warmup_steps >= total:
            problems.append(
                f"optim.warmup_steps = {o.warmup_steps}: must be < the run's {total} optimiser "
                f"steps ({o.epochs} epochs x ({n_train} examples // batch {o.batch_size})"
                f"{', capped by max_steps' if o.max_steps else ''})"
            )


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------


def config_from_dict(
    raw: Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    name: str = "config",
    check_paths: bool = True,
) -> Config:
    """Build and validate a Config from a nested mapping (plus overrides).

    Raises ConfigError listing every problem found.
    """
    import copy

    problems: list[str] = []
    raw = copy.deepcopy(dict(raw or {}))
    apply_overrides(raw, overrides, problems)
    bad: set[str] = set()
    cfg = _build(Config, raw, "", problems, bad)
    if check_paths:
        cfg = _resolve_paths(cfg, problems, bad)
    _cross_checks(cfg, problems, bad)
    if problems:
        raise ConfigError(f"invalid config ({name}):\n" + "\n".join(f"  - {p}" for p in problems))
    return dataclasses.replace(
        cfg,
        method=cfg.method or cfg.controller.kind,
        output_dir=cfg.output_dir or str(Path("runs") / (Path(name).stem or "run")),
    )


def resolve_config_path(name: str | os.PathLike) -> Path:
    """The YAML file ``name`` names: a path as given, else a config shipped in the package.

    ``tiny_cpu``, ``tiny_cpu.yaml`` and ``configs/tiny_cpu.yaml`` all name
    ``hacbo_jax/configs/tiny_cpu.yaml`` when no such file exists from the current directory.
    Returns the path as given when nothing matches (reading it then reports the problem).
    """
    given = Path(name).expanduser()
    if given.is_file():
        return given
    stem = given.name if given.parent in (Path("."), Path("configs")) else None
    if stem is not None:
        for candidate in (CONFIGS_DIR / stem, CONFIGS_DIR / f"{stem}.yaml"):
            if candidate.is_file():
                return candidate
    return given


def shipped_configs() -> list[str]:
    """Names of the configs shipped in ``hacbo_jax/configs`` (usable as ``--config NAME``)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (YAML; a shipped config's name works too), apply dotted ``key=value``
    overrides and validate."""
    path = resolve_config_path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(
            f"config file {str(path)!r}: cannot be read ({e.strerror}); must be a YAML file or "
            f"the name of a shipped config: {', '.join(shipped_configs())}"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r}: not valid YAML: {e}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(
            f"config file {str(path)!r}: must be a YAML mapping of sections, "
            f"got {type(raw).__name__}"
        )
    return config_from_dict(raw or {}, overrides, name=str(path))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain nested dicts (YAML/JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loadable again by :func:`load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


def parse_cli(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "python -m train.finetune",
    description: str | None = None,
) -> tuple[Config, argparse.Namespace]:
    """``--config X.yaml [key=value ...] [--resume]`` -> (Config, args).

    On a config problem prints the ConfigError message and exits with status 2 (argparse's
    convention for usage errors), so no work starts.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="YAML file under configs/")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, values parsed as YAML (e.g. optim.lr=1e-4)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in output_dir"
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg, args
