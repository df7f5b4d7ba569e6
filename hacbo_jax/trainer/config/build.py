"""Nested mapping -> schema dataclasses, with type coercion; problems are collected, not raised."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Literal, Mapping

import yaml

__all__ = ["build_dataclass", "coerce", "describe_type", "format_value"]

# ---------------------------------------------------------------------------------------------
# Building: dict -> dataclasses, with type checks.
# ---------------------------------------------------------------------------------------------


def describe_type(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        args = typing.get_args(tp)
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(describe_type(a) for a in inner)
        return text + " or null" if type(None) in args else text
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {int: "an int", float: "a number", bool: "true/false", str: "a non-empty string"}.get(
        tp, str(tp)
    )


def coerce(value: Any, tp) -> Any:
    """Return ``value`` as type ``tp``, or raise TypeError (message = what is allowed)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for inner in (a for a in args if a is not type(None)):  # the first that accepts it
            try:
                return coerce(value, inner)
            except TypeError:
                pass
        raise TypeError(describe_type(tp))
    if origin is Literal:
        if value in typing.get_args(tp) and isinstance(value, str):
            return value
        raise TypeError(describe_type(tp))
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
    raise TypeError(describe_type(tp))


def format_value(value: Any) -> str:
    return (
        repr(value)
        if isinstance(value, str)
        else yaml.safe_dump(value, default_flow_style=True, width=10**6)
        .strip()
        .removesuffix("...")
        .strip()
    )


def build_dataclass(cls, raw: Any, prefix: str, problems: list[str], bad: set[str]):
    """Build dataclass ``cls`` from ``raw``; problems are appended, rejected keys added to ``bad``
    (their defaults are used so that the remaining checks can still run)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append(
            f"{prefix.rstrip('.') or '<top level>'} = {format_value(raw)}: must be {describe_type(cls)}"
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
            kwargs[f.name] = build_dataclass(tp, value, name + ".", problems, bad)
            continue
        try:
            coerced = coerce(value, tp)
        except TypeError as e:
            problems.append(f"{name} = {format_value(value)}: must be {e}")
            bad.add(name)
            continue
        check = f.metadata.get("check")
        why = check(coerced) if check else None
        if why:
            problems.append(f"{name} = {format_value(value)}: must be {why}")
            bad.add(name)
            continue
        kwargs[f.name] = coerced
    return cls(**kwargs)
