"""Every check of a config, in one place, reported through one :class:`ConfigError`.

Static checks (types, ranges, unknown keys: :mod:`.build`), paths (looked up in the current
directory, then in the installed package), cross-field rules (some open the data file), and the
checks that need the loaded data or the devices (:func:`check_mesh`, :func:`check_pool_size`,
:func:`check_warmup`), which the run calls once it knows them.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any

from hacbo_jax.training.config.schema import Config
from hacbo_jax.training.config_fields import ConfigError
from hacbo_jax.training.synthetic import PRESETS

# Relative paths in a config are looked up in the current directory, then here: the installed
# package, so that the defaults ("assets/tiny-qwen3-gsm", "assets/gsm8k/...") are package data.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------
# Paths and cross-field rules (problems are collected, not raised).
# ---------------------------------------------------------------------------------------------


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


def resolve_paths(cfg: Config, problems: list[str], bad: set[str]) -> Config:
    """``cfg`` with its local paths resolved (current directory, then the package)."""
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


def resolve_tokenizer(cfg: Config, problems: list[str], bad: set[str]) -> Config:
    """``cfg`` with ``model.tokenizer`` resolved: a given local directory (current directory,
    then the package) must hold tokenizer files; null becomes the model directory's tokenizer,
    or the shipped Qwen3 tokenizer for a Qwen3 directory without one
    (:func:`hacbo_jax.training.tokenizer.default_tokenizer`); a hub id is kept."""
    from hacbo_jax.training.tokenizer import TOKENIZER_FILES, default_tokenizer, has_tokenizer

    if "model.path" in bad or "model.tokenizer" in bad:
        return cfg
    given = cfg.model.tokenizer
    if given is None:
        try:
            resolved = default_tokenizer(cfg.model.path)
        except ValueError as e:
            problems.append(f"model.tokenizer = null: {e}")
            bad.add("model.tokenizer")
            return cfg
    else:
        found = _resolve_existing(given)
        if found is not None:
            if not found.is_dir() or not has_tokenizer(found):
                problems.append(
                    f"model.tokenizer = {given!r}: must be a tokenizer directory holding "
                    f"{' or '.join(TOKENIZER_FILES)} (looked in {found}), or a hub id"
                )
                bad.add("model.tokenizer")
                return cfg
            resolved = str(found)
        elif _looks_like_local_path(given):
            problems.append(
                f"model.tokenizer = {given!r}: no such local directory (looked in the current "
                f"directory and {PACKAGE_ROOT}); must be a tokenizer directory or a hub id"
            )
            bad.add("model.tokenizer")
            return cfg
        else:
            resolved = given
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tokenizer=resolved))


def check_data_format(cfg: Config, problems: list[str], bad: set[str]) -> None:
    """The data format fits the task, and local data files have a supported type."""
    from hacbo_jax.training.formats import FILE_SUFFIXES

    d = cfg.data
    if d.task == "synthetic" and d.format != "question_answer" and "data.format" not in bad:
        problems.append(
            f"data.format = {d.format!r}: the synthetic task is in question_answer format; "
            "other formats need data.task: gsm8k (files or hub)"
        )
    if d.task != "gsm8k" or d.hub_name is not None:
        return
    for key in ("train_file", "eval_file"):
        suffix = Path(getattr(d, key)).suffix.lower()
        if f"data.{key}" not in bad and suffix not in FILE_SUFFIXES:
            problems.append(
                f"data.{key} = {getattr(d, key)!r}: unsupported file type {suffix or '(none)'!r}; "
                f"must be one of {', '.join(FILE_SUFFIXES)}"
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


def cross_checks(cfg: Config, problems: list[str], bad: set[str]) -> None:
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
