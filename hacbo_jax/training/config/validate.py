"""Every check of a config, in one place, reported through one :class:`ConfigError`.

Static checks (types, ranges, unknown keys: :mod:`.build`), paths (looked up in the current
directory, then in the installed package), cross-field rules (some open the data file), and the
checks that need the loaded data or the devices (:func:`check_mesh`, :func:`check_pool_size`,
:func:`check_warmup`), which the run calls once it knows them.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from hacbo_jax.training.config.build import build_dataclass
from hacbo_jax.training.config.schema import Config
from hacbo_jax.training.config_fields import ConfigError
from hacbo_jax.training.synthetic import PRESETS

# Relative paths in a config are looked up in the current directory, then here: the installed
# package, so that the defaults ("assets/tiny-qwen3-gsm", "assets/gsm8k/...") are package data.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
CONFIGS_DIR = PACKAGE_ROOT / "configs"

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
    """None when ``preset`` is one of :data:`hacbo_jax.training.synthetic.PRESETS`."""
    if preset in PRESETS:
        return None
    close = difflib.get_close_matches(preset, PRESETS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (
        f"data.synthetic.preset = {preset!r}: must be one of "
        + ", ".join(map(repr, PRESETS))
        + hint
    )


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

    problems: list[str] = []
    raw = copy.deepcopy(dict(raw or {}))
    apply_overrides(raw, overrides, problems)
    bad: set[str] = set()
    cfg = build_dataclass(Config, raw, "", problems, bad)
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


# ---------------------------------------------------------------------------------------------
# Checks that need the loaded data or the devices (the run calls them before any work).
# ---------------------------------------------------------------------------------------------


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def check_warmup(cfg: Config, total_steps: int) -> None:
    """ConfigError unless ``optim.warmup_steps < total_steps`` (the run's optimiser steps)."""
    if cfg.optim.warmup_steps >= total_steps:
        _raise(
            [
                f"optim.warmup_steps = {cfg.optim.warmup_steps}: must be < the run's "
                f"{total_steps} optimiser steps (epochs x (train examples // batch_size), capped "
                "by max_steps); the learning rate would never leave warm-up"
            ]
        )


def check_pool_size(cfg: Config, pool_size: int) -> None:
    """ConfigError unless the micro-dev buffer fits in its pool of ``pool_size`` examples."""
    if cfg.microdev.size > pool_size:
        _raise(
            [
                f"microdev.size = {cfg.microdev.size}: must be <= the micro-dev pool's "
                f"{pool_size} examples (microdev.pool = {cfg.microdev.pool!r})"
            ]
        )


def check_mesh(cfg: Config) -> Any:
    """The ``(data, fsdp)`` mesh of ``cfg.mesh``, checked against the devices and the batch.

    Raises ConfigError when the mesh does not fit the devices present, or when
    ``optim.micro_batch_size`` (default: ``optim.batch_size``) cannot be split evenly over its
    ``data * fsdp`` devices.
    """
    try:
        mesh = cfg.mesh.build()
    except ValueError as e:
        raise ConfigError(f"invalid config:\n  - {e}") from e
    micro = cfg.optim.micro_batch_size or cfg.optim.batch_size
    if micro % mesh.size:
        _raise(
            [
                f"optim.micro_batch_size = {micro}"
                f"{'' if cfg.optim.micro_batch_size else ' (= optim.batch_size)'}: must be "
                f"divisible by the mesh's {mesh.size} devices (mesh.data={mesh.shape['data']} x "
                f"mesh.fsdp={mesh.shape['fsdp']}), which split each micro-batch between them"
            ]
        )
    return mesh
