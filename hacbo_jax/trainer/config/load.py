"""Reading and writing configs: YAML file (or shipped name) + dotted overrides -> validated
:class:`Config`, and back to YAML.

A config file may start from another: ``extends: NAME`` (a shipped config's name, e.g.
``paper_hacbo``, or a path relative to the extending file, e.g. ``../base.yaml``) deep-merges
the file over that config (which may extend another in turn): a mapping merges key by key,
anything else (a value, a list, ``null``) replaces the base's; ``null`` for a whole section
gives the schema's defaults for it. ``output_dir`` is the one key not inherited: a file names
its own run directory, or gets ``runs/<its name>``. The checks (duplicate keys per file, unknown
keys, values) see the merged result, which is also what ``--print-config`` prints and a run
saves; it has no ``extends``.
"""

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
    check_model_limits,
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


def duplicate_overrides(overrides: Sequence[str]) -> list[str]:
    """Problems for keys given more than once in a command line's overrides (the last would win
    silently, as a duplicate YAML key would; both are refused). Programs that layer overrides
    (a sweep adding its own after a config's) call :func:`load_config` directly, where the last
    one wins."""
    seen: dict[str, str] = {}
    problems = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        key = key.strip()
        if not sep or not key:
            continue  # reported by apply_overrides
        if key in seen:
            problems.append(
                f"override {key!r} given twice ({seen[key]!r}, then {item!r}); give each key "
                "once"
            )
        else:
            seen[key] = item
    return problems


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
    if check_paths:
        check_model_limits(cfg, problems, bad)
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
    if not str(name).strip():
        raise ConfigError(
            f"--config {str(name)!r}: empty; must be a YAML file or the name of a shipped "
            f"config: {', '.join(shipped_configs())}"
        )
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


def _read_yaml_mapping(path: Path) -> dict:
    """One config file as a dict; ConfigError naming the file otherwise (a file with no
    settings, only comments or nothing, included: it would run on every default)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {str(path)!r}: not UTF-8 text (byte {e.start}: {e.object[e.start]:#04x}); "
            "must be a YAML file"
        ) from None
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
    if not raw:
        raise ConfigError(
            f"config file {str(path)!r}: holds no settings (empty, or only comments); start "
            "from a shipped config with 'extends: NAME' (e.g. extends: tiny_cpu) and change "
            "what differs"
        )
    return raw


def _extended_path(name: Any, path: Path) -> Path:
    """The file ``extends: name`` in ``path`` names: a path (with a '/' or a .yaml/.yml
    suffix) relative to ``path``'s directory, else a shipped config's name."""
    where = f"config file {str(path)!r}: extends = {name!r}"
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(
            f"{where}: must be the name of a shipped config ({', '.join(shipped_configs())}) "
            "or a YAML file's path relative to this file"
        )
    given = Path(name).expanduser()
    if "/" in name or os.sep in name or given.suffix in (".yaml", ".yml"):
        target = given if given.is_absolute() else path.parent / given
        if not target.is_file():
            raise ConfigError(
                f"{where}: no such file ({str(target)!r}; a path is relative to the extending "
                f"file); shipped configs: {', '.join(shipped_configs())}"
            )
        return target
    if name not in shipped_configs():
        raise ConfigError(
            f"{where}: not a shipped config; must be one of {', '.join(shipped_configs())} "
            "(or a YAML file's path relative to this file, e.g. ./base.yaml)"
        )
    return CONFIGS_DIR / f"{name}.yaml"


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``overlay`` over ``base``: mappings present in both merge recursively, every other value of
    ``overlay`` (a scalar, a list, ``null``) replaces the base's. Neither argument is changed."""
    merged = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The config ``path`` names (a shipped config's name works too) as a nested dict, with its
    ``extends`` chain merged in (see the module docstring) and no ``extends`` key left.

    ConfigError (naming the file) for an unreadable file, invalid YAML, a duplicate key, an
    unknown ``extends`` name, or a cycle (naming the chain). Keys and values are not checked
    here: :func:`config_from_dict` checks the merged result.
    """
    seen: list[Path] = []
    chain: list[str] = []
    layers: list[dict] = []
    current = resolve_config_path(path)
    while True:
        resolved = current.resolve()
        chain.append(str(current))
        if resolved in seen:
            raise ConfigError(
                f"config file {str(path)!r}: extends forms a cycle: {' -> '.join(chain)}"
            )
        seen.append(resolved)
        raw = _read_yaml_mapping(current)
        has_base = "extends" in raw
        name = raw.pop("extends", None)
        if layers:  # a base's run directory is its own, not the extending file's
            raw.pop("output_dir", None)
        layers.append(raw)
        if not has_base:
            break
        current = _extended_path(name, current)
    merged: dict[str, Any] = {}
    for layer in reversed(layers):
        merged = deep_merge(merged, layer)
    return merged


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (YAML; a shipped config's name works too; ``extends`` merged in: see
    :func:`read_config_file`), apply dotted ``key=value`` overrides and validate."""
    path = resolve_config_path(path)
    return config_from_dict(read_config_file(path), overrides, name=str(path))


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
