"""Label trees for the controllers from regular expressions over parameter paths."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax

PyTree = Any


def leaf_path(path: Sequence[Any]) -> str:
    """The "/"-joined names of a jax key path, e.g. ``"layers/3/mlp/kernel"``."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def label_by_rules(
    params: PyTree, rules: Sequence[tuple[str, str]], default: str = "other"
) -> PyTree:
    r"""Labels every leaf of ``params`` for :func:`hacbo` / :func:`blac`.

    Each rule is ``(regex, template)``: the regex is searched (``re.search``) in the leaf's
    "/"-joined key path and the label is ``match.expand(template)``; the first matching rule
    wins, and a leaf no rule matches gets ``default``. Example for a Flax model whose blocks
    live under ``layers/<i>/``::

      label_by_rules(params, [(r"layers/(\d+)/attn/", r"\1/attn"),
                              (r"layers/(\d+)/mlp/", r"\1/mlp")])

    Raises:
      ValueError: for a rule that is not a (regex, template) pair or does not compile.
    """
    compiled = []
    for rule in rules:
        if not (
            isinstance(rule, (tuple, list))
            and len(rule) == 2
            and all(isinstance(x, str) for x in rule)
        ):
            raise ValueError(
                f"each rule must be a (regex, label template) pair of strings, got {rule!r}"
            )
        try:
            compiled.append((re.compile(rule[0]), rule[1]))
        except re.error as err:
            raise ValueError(f"rule regex {rule[0]!r} does not compile: {err}") from err

    def label(path, _):
        name = leaf_path(path)
        for pattern, template in compiled:
            match = pattern.search(name)
            if match is not None:
                return match.expand(template)
        return default

    return jax.tree_util.tree_map_with_path(label, params)
