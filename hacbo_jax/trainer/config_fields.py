"""The building blocks of the config schema: the one error type and per-field constraints.

A constraint (``Check``) returns None when a value is fine, else a text saying what is allowed;
:func:`option` attaches one to a dataclass field's metadata, where the config builder finds it.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any, Callable, Optional

__all__ = ["Check", "ConfigError", "in_range", "mesh_size_check", "option"]


class ConfigError(ValueError):
    """A configuration problem (or several), described for the person who wrote the config."""


# ---------------------------------------------------------------------------------------------
# Field constraints. A check returns None when the value is fine, else a text saying what is
# allowed; it only sees values whose type was already accepted.
# ---------------------------------------------------------------------------------------------

Check = Callable[[Any], Optional[str]]


def in_range(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> Check:
    """Values in the interval ``lo..hi`` (either end optional, closed unless ``*_open``)."""

    def check(v):
        if v is None:
            return None
        ok = True
        if lo is not None:
            ok &= v > lo if lo_open else v >= lo
        if hi is not None:
            ok &= v < hi if hi_open else v <= hi
        if ok:
            return None
        if lo is not None and hi is not None:
            return f"a value in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        if lo is not None:
            return f"a value {'>' if lo_open else '>='} {lo}"
        return f"a value {'<' if hi_open else '<='} {hi}"

    return check


def mesh_size_check(v: int) -> str | None:
    """``mesh.data``: a positive device count, or -1 for all devices."""
    return None if v == -1 or v >= 1 else "a positive int, or -1 for all devices"


def option(default: Any, check: Check | None = None) -> Any:
    """A dataclass field with ``default`` whose values must pass ``check``."""
    return field(default=default, metadata={"check": check})
