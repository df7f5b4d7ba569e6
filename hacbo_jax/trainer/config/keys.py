"""Every config key with its default and one-line help: ``--help`` and the docs' key table.

Nothing here is written by hand: the help of a key is the ``help`` of its schema field
(:func:`~hacbo_jax.trainer.config_fields.option`), and for a controller's section
(``controller.<kind>.<arg>``) the first sentence of that argument's entry in the ``Args:``
section of the controller's transformation's docstring (``hacbo_jax.controllers``), so the
config, ``--help``, the docs and the function cannot describe an argument differently.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Callable, Iterator
from typing import Any

from hacbo_jax.trainer.config.build import describe_type, format_value
from hacbo_jax.trainer.config.schema import Config
from hacbo_jax.trainer.controller_registry import CONTROLLERS

__all__ = [
    "config_key_table",
    "controller_arg_help",
    "describe_keys",
    "docstring_args",
    "first_sentence",
    "iter_keys",
    "key_help",
]

# ---------------------------------------------------------------------------------------------
# Google-style docstrings: the ``Args:`` section.
# ---------------------------------------------------------------------------------------------

_SECTION = re.compile(r"^(\s*)(Args|Arguments):\s*$")
# "name: text" or "name (type): text"; *args / **kwargs too.
_ENTRY = re.compile(r"^(\*{0,2}[A-Za-z_]\w*)\s*(?:\([^)]*\))?\s*:(?:\s+(.*))?$")


def docstring_args(doc: str | None) -> dict[str, str]:
    """``{argument: its text}`` from the Google-style ``Args:`` section of ``doc``.

    An entry is ``name: text`` (or ``name (type): text``) at the section's first indentation;
    deeper-indented lines continue it and are joined with single spaces. The section ends at the
    first non-blank line indented no deeper than ``Args:`` itself (the next section, e.g.
    ``Returns:``). No ``Args:`` section: ``{}``.
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    entries: dict[str, list[str]] = {}
    section_indent = entry_indent = None
    current: list[str] | None = None
    for line in lines:
        if section_indent is None:
            m = _SECTION.match(line)
            if m:
                section_indent = len(m.group(1))
            continue
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= section_indent:
            break
        if entry_indent is None:
            entry_indent = indent
        m = _ENTRY.match(line.strip()) if indent == entry_indent else None
        if m:
            current = entries.setdefault(m.group(1).lstrip("*"), [])
            if m.group(2):
                current.append(m.group(2).strip())
        elif current is not None and indent > entry_indent:
            current.append(line.strip())
    return {name: " ".join(parts) for name, parts in entries.items()}


# A sentence ends at '.', '!' or '?' followed by a space and a capital letter or a digit
# (not after "e.g" / "i.e"), or at the end of the text.
_SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)[.!?](?=\s+[A-Z0-9])|[.!?]?$")


def first_sentence(text: str) -> str:
    """The first sentence of a docstring entry, as a one-line help: without its final period and
    without reST inline-literal quotes (````"rms"```` -> ``"rms"``)."""
    text = " ".join(text.replace("``", "").split())
    return text[: _SENTENCE_END.search(text).start()].rstrip()


def controller_arg_help(transform: Callable[..., Any]) -> dict[str, str]:
    """``{argument: one-line help}`` of a controller's transformation, from its docstring."""
    return {name: first_sentence(text) for name, text in docstring_args(transform.__doc__).items()}


# ---------------------------------------------------------------------------------------------
# The keys of the schema.
# ---------------------------------------------------------------------------------------------


def _transforms_by_section() -> dict[type, Callable[..., Any]]:
    """Config section type -> the transformation whose keyword arguments its fields are."""
    return {
        e.config_type: e.transform
        for e in CONTROLLERS.values()
        if e.config_type is not None and e.transform is not None
    }


def _walk(cls: type, prefix: str) -> Iterator[tuple[str, Any, Any, dataclasses.Field, type]]:
    """``(dotted key, type, default, field, section type)`` of every leaf key, in schema order."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, tp, getattr(defaults, f.name), f, cls


def iter_keys(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(dotted key, type, default)`` of every leaf key of the schema, in schema order."""
    for key, tp, default, _, _ in _walk(cls, prefix):
        yield key, tp, default


def key_help(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """``{dotted key: one-line help}`` for every leaf key of the schema, in schema order.

    A controller section's field: the first sentence of its transformation's docstring entry
    for the argument (:func:`controller_arg_help`); where the docstring has none, the field's
    own ``help`` (a stopgap a test keeps from outliving the docstring entry). Any other field:
    its ``help`` metadata. ``""`` where neither exists (a test forbids that).
    """
    transforms = _transforms_by_section()
    docs: dict[type, dict[str, str]] = {}
    out = {}
    for key, _, _, f, section in _walk(cls, prefix):
        text = None
        if section in transforms:
            if section not in docs:
                docs[section] = controller_arg_help(transforms[section])
            text = docs[section].get(f.name)
        out[key] = text or f.metadata.get("help") or ""
    return out


def describe_keys() -> str:
    """Every key with its default and description, one per line (the ``--help`` epilog)."""
    helps = key_help()
    rows = [(key, format_value(default)) for key, _, default in iter_keys()]
    width = max(len(k) + len(d) for k, d in rows) + 3
    lines = [f"  {f'{key} = {default}':<{width}} {helps[key]}".rstrip() for key, default in rows]
    return "config keys (KEY = DEFAULT  description):\n" + "\n".join(lines)


def _allowed(tp: Any, f: dataclasses.Field) -> str:
    """What a key accepts: its type, and its range where it has one."""
    text = describe_type(tp)
    allowed = getattr(f.metadata.get("check"), "allowed", None)
    return f"{text}, {allowed}" if allowed else text


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def config_key_table() -> str:
    """Every config key as a Markdown table: key | default | allowed | description (generated
    for the docs; never edit the docs' copy by hand)."""
    helps = key_help()
    rows = [
        "| key | default | allowed | description |",
        "| --- | --- | --- | --- |",
    ]
    for key, tp, default, f, _ in _walk(Config, ""):
        rows.append(
            f"| `{key}` | `{_cell(format_value(default))}` | {_cell(_allowed(tp, f))} "
            f"| {_cell(helps[key])} |"
        )
    return "\n".join(rows) + "\n"
