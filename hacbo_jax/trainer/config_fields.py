"""The building blocks of the config schema: the one error type and per-field constraints.

A constraint (``Check``) returns None when a value is fine, else a text saying what is allowed;
:func:`option` attaches one, and the key's one-line help, to a dataclass field's metadata, where
the config builder (the check) and ``--help`` / the docs' key table (the help,
:mod:`hacbo_jax.trainer.config.keys`) find them.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any, Callable, Optional

__all__ = ["Check", "ConfigError", "in_range", "mesh_size_check", "option"]


class ConfigError(ValueError):
    """A configuration problem (or several), described for the person who wrote the config."""


# ---------------------------------------------------------------------------------------------
# Field constraints. A check returns None when the value is fine, else a text saying what is
# allowed; it only sees values whose type was already accepted. Its ``allowed`` attribute (when
# set) says the same for every value, for the key table of the docs.
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
    if lo is not None and hi is not None:
        allowed = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        allowed = f"{'>' if lo_open else '>='} {lo}"
    elif hi is not None:
        allowed = f"{'<' if hi_open else '<='} {hi}"
    else:
        allowed = "any number"

    def check(v):
        if v is None:
            return None
        ok = True
        if lo is not None:
            ok &= v > lo if lo_open else v >= lo
        if hi is not None:
            ok &= v < hi if hi_open else v <= hi
        return None if ok else f"a value {allowed}"

    check.allowed = allowed  # type: ignore[attr-defined]
    return check


def mesh_size_check(v: int) -> str | None:
    """``mesh.data``: a positive device count, or -1 for all devices."""
    return None if v == -1 or v >= 1 else "a positive int, or -1 for all devices"


mesh_size_check.allowed = ">= 1, or -1 for all devices"  # type: ignore[attr-defined]


def option(default: Any, check: Check | None = None, *, help: str | None = None) -> Any:
    """A dataclass field with ``default`` whose values must pass ``check``; ``help`` is the key's
    one-line description (``--help``, the docs' key table).

    Every field of the schema's own sections gives ``help`` (a test checks). The fields of a
    controller's section leave it out: theirs is the transformation's docstring entry for the
    argument (:func:`hacbo_jax.trainer.config.keys.key_help`), so the two cannot disagree.
    """
    metadata: dict[str, Any] = {"check": check}
    if help is not None:
        metadata["help"] = help
    return field(default=default, metadata=metadata)
