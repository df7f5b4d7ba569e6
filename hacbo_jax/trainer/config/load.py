"""Reading and writing configs: YAML file (or shipped name) + dotted overrides -> validated
:class:`Config`, and back to YAML."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from hacbo_jax.trainer.config.build import build_dataclass
from hacbo_jax.trainer.config.schema import Config
from hacbo_jax.trainer.config.validate import (
    PACKAGE_ROOT,
    check_data_format,
    check_data_rows,
    check_finite,
    check_method_label,
    cross_checks,
    resolve_paths,
    resolve_tokenizer,
)
from hacbo_jax.trainer.config_fields import ConfigError



def _configs_dir() -> Path:
    """The shipped configs: the checkout's top-level ``configs/`` (a source tree or an editable
    install), else ``hacbo_jax/configs`` inside an installed wheel (pyproject maps one to the
    other)."""
    checkout = PACKAGE_ROOT.parent / "configs"
    if (checkout / "tiny_cpu.yaml").is_file():
        return checkout
    return PACKAGE_ROOT / "configs"


CONFIGS_DIR = _configs_dir()

# Where YAML starts a comment: a '#' at the start or after whitespace.
_YAML_COMMENT = re.compile(r"(^|\s)#")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (YAML keeps the last one
    silently, so an edited config could run with a value its author did not see)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {seen[key] + 1}, again at line "
                    f"{key_node.start_mark.line + 1}); each key may appear once per section",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


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
        if _YAML_COMMENT.search(text):
            # YAML would cut "run #2" to "run" (and "#1" to null): on a command line a '#' is
            # part of the value. A number followed by a comment then fails its type check.
            value = text.strip()
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
        cfg = resolve_paths(cfg, problems, bad)
        cfg = resolve_tokenizer(cfg, problems, bad)
    check_data_format(cfg, problems, bad)
    check_finite(cfg, problems, bad)
    check_method_label(cfg, problems, bad)
    check_data_rows(cfg, problems, bad)
    cross_checks(cfg, problems, bad)
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
    ``configs/tiny_cpu.yaml`` when no such file exists from the current directory.
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
    """Names of the configs shipped in ``configs`` (usable as ``--config NAME``)."""
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
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
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
