"""hacbo_jax.trainer.config.keys: every key's help has one source (the schema field's ``help``, or
for a controller key the transformation's ``Args:`` docstring entry), shown by ``--help`` and
the docs' generated key table."""

import dataclasses
import inspect
import re
import typing

import pytest

from hacbo_jax.trainer.config import parse_cli
from hacbo_jax.trainer.config.keys import (
    config_key_table,
    controller_arg_help,
    describe_keys,
    docstring_args,
    first_sentence,
    iter_keys,
    key_help,
)
from hacbo_jax.trainer.config.schema import Config, ControllerConfig
from hacbo_jax.trainer.controller_registry import CONTROLLERS

KEYS = [key for key, _, _ in iter_keys()]
CONTROLLER_KINDS = [k for k, e in CONTROLLERS.items() if e.config_type is not None]
# Arguments of a transformation that no config field sets: the label tree and the sub-module
# order (derived from the labels); a wrapping controller's base optimiser (AdamW of ``optim``)
# and what the run supplies (``ControllerEntry.run_args``: steps_per_epoch, seed).
NOT_CONFIGURED = {"labels", "submodules", "inner"}
# Config fields for a transformation argument WITHOUT a default: the config's default.
CONFIG_ONLY_DEFAULTS = {("adagradselect", "pct"): 0.1}  

def _controller_sections():
    """``(kind, section field, transformation)`` for every controller config field."""
    for kind in CONTROLLER_KINDS:
        entry = CONTROLLERS[kind]
        for f in dataclasses.fields(entry.config_type):
            yield kind, f, entry.transform


def _schema_fields(cls=Config, prefix=""):
    """``(dotted key, field, section type)`` of every leaf of the schema."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _schema_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, cls


# -- one help per key ---------------------------------------------------------------------------


def test_every_schema_key_has_a_non_empty_one_line_help():
    helps = key_help()
    assert list(helps) == KEYS
    empty = [k for k, text in helps.items() if not text.strip()]
    assert not empty, f"keys without help: {empty}"
    assert not [k for k, text in helps.items() if "\n" in text]


def test_every_non_controller_field_carries_its_help_in_the_schema():
    sections = {e.config_type for e in CONTROLLERS.values() if e.config_type is not None}
    missing = [
        key
        for key, f, owner in _schema_fields()
        if owner not in sections and not f.metadata.get("help", "").strip()
    ]
    assert not missing, f"schema fields without option(..., help=...): {missing}"
    assert [k for k, _, _ in _schema_fields()] == KEYS  # the walk above sees every key


@pytest.mark.parametrize("kind", CONTROLLER_KINDS)
def test_controller_fields_are_keywords_of_the_transformation_with_its_defaults(kind):
    entry = CONTROLLERS[kind]
    params = inspect.signature(entry.transform).parameters
    for f in dataclasses.fields(entry.config_type):
        assert f.name in params, f"controller.{kind}.{f.name} is not an argument of {kind}()"
        p = params[f.name]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, f.name
        expected = (
            CONFIG_ONLY_DEFAULTS[(kind, f.name)]
            if p.default is inspect.Parameter.empty
            else p.default
        )
        assert f.default == expected, f"controller.{kind}.{f.name}"
    # Every other keyword is set by the stack, never by a config: nothing is silently fixed.
    configured = {f.name for f in dataclasses.fields(entry.config_type)}
    rest = set(params) - configured - NOT_CONFIGURED - set(entry.run_args)
    assert not rest, f"{kind}() arguments no config key or run sets: {rest}"
    assert {k for (kd, k) in CONFIG_ONLY_DEFAULTS if kd == kind} <= configured


@pytest.mark.parametrize("kind", CONTROLLER_KINDS)
def test_controller_fields_are_documented_in_the_transformations_args_section(kind):
    entry = CONTROLLERS[kind]
    documented = docstring_args(entry.transform.__doc__)
    missing = [f.name for f in dataclasses.fields(entry.config_type) if f.name not in documented]
    assert not missing, f"{kind}() docstring Args: lacks {missing}"
    # The run's arguments are documented too (the configured ones are checked above).
    assert set(entry.run_args) <= set(documented)


def test_a_controller_field_has_help_metadata_only_without_a_docstring_entry():
    """The docstring is the one source: a stopgap ``help`` must go once the entry exists."""
    both = []
    for kind, f, transform in _controller_sections():
        if f.metadata.get("help") and f.name in docstring_args(transform.__doc__):
            both.append(f"controller.{kind}.{f.name}")
    assert not both, f"delete the help= of {both}: the docstring documents them now"


def test_controller_help_is_the_first_sentence_of_the_docstring_entry():
    helps = key_help()
    for kind, f, transform in _controller_sections():
        entry = docstring_args(transform.__doc__).get(f.name)
        if entry is not None:
            assert helps[f"controller.{kind}.{f.name}"] == first_sentence(entry)


def test_help_shows_hacbos_docstring_text_for_rho(capsys):
    from hacbo_jax import hacbo

    # The docstring's line, read without the parser under test.
    text = re.search(r"^\s+rho: (.+)$", hacbo.__doc__, re.MULTILINE).group(1).strip()
    with pytest.raises(SystemExit):
        parse_cli(["--help"])
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.strip().startswith("controller.hacbo.rho = ")]
    assert line.split(None, 3)[3] == text.removesuffix(".")
    assert key_help()["controller.hacbo.rho"] == text.removesuffix(".")


def test_controller_kind_help_names_every_registered_controller():
    text = key_help()["controller.kind"]
    for kind in CONTROLLERS:
        assert kind in text


# -- the docstring parser -----------------------------------------------------------------------


def test_docstring_args_reads_google_style_entries():
    def f(a, b, *args, c=1, **kwargs):
        """Summary line.

        Args:
          a: first
            continued here.
          b (int): second: with a colon.

          *args: extra positionals.
          c: ``"x"`` (default) or ``"y"``. More detail
            that follows.
          **kwargs: passed on.

        Returns:
          nothing: not an argument.
        """

    assert docstring_args(f.__doc__) == {
        "a": "first continued here.",
        "b": "second: with a colon.",
        "args": "extra positionals.",
        "c": '``"x"`` (default) or ``"y"``. More detail that follows.',
        "kwargs": "passed on.",
    }
    assert docstring_args("No sections at all.") == {} and docstring_args(None) == {}


def test_first_sentence():
    assert (
        first_sentence("EMA factor for a and c, in [0, 1).") == "EMA factor for a and c, in [0, 1)"
    )
    assert first_sentence('``"x"`` (default) or ``"y"``. More.') == '"x" (default) or "y"'
    assert first_sentence("a value, e.g. 0.1 or 0.3. 0 turns it off.") == "a value, e.g. 0.1 or 0.3"
    assert first_sentence("lambda > 0, or None for ln(100) / (N - 1).") == (
        "lambda > 0, or None for ln(100) / (N - 1)"
    )
    assert first_sentence("no period") == "no period"


def test_controller_arg_help_covers_the_signature_of_hacbo():
    from hacbo_jax import hacbo

    helps = controller_arg_help(hacbo)
    assert set(inspect.signature(hacbo).parameters) <= set(helps)


# -- generated outputs --------------------------------------------------------------------------


def test_describe_keys_lists_key_default_and_help_in_schema_order():
    lines = describe_keys().splitlines()
    assert lines[0] == "config keys (KEY = DEFAULT  description):"
    helps = key_help()
    assert [ln.split(" = ", 1)[0].strip() for ln in lines[1:]] == KEYS
    for line, key in zip(lines[1:], KEYS):
        assert line.startswith(f"  {key} = ") and line.endswith(helps[key])
    assert "  optim.lr = 0.0001" in describe_keys()


def test_config_key_table_has_one_row_per_key():
    table = config_key_table()
    lines = table.strip().splitlines()
    assert lines[0] == "| key | default | allowed | description |"
    assert set(lines[1].replace("|", "").split()) == {"---"}
    rows = lines[2:]
    assert [re.match(r"^\| `([^`]+)` \|", row).group(1) for row in rows] == KEYS
    helps = key_help()
    for row, key in zip(rows, KEYS):
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
        assert len(cells) == 4, row
        assert cells[3] == helps[key].replace("|", "\\|")
    by_key = dict(zip(KEYS, rows))
    assert "| `0.0001` | a number, > 0 | peak learning rate of AdamW |" in by_key["optim.lr"]
    assert "one of 'none', 'blac', 'hacbo', 'adagradselect'" in by_key["controller.kind"]
    assert ">= 1, or -1 for all devices" in by_key["mesh.data"]


def test_the_controller_config_type_is_walked_like_any_section():
    assert dataclasses.is_dataclass(ControllerConfig)
    assert "controller.kind" in KEYS and "controller.hacbo.rho" in KEYS
