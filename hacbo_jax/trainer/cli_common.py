"""Pieces every command line of the training stack shares (light: no JAX import)."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence

__all__ = ["add_overrides_argument", "command_line", "usage_error"]


def usage_error(prog: str, error: Exception) -> int:
    """Prints ``PROG: error: ...`` (argparse's format) and returns exit status 2."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


def add_overrides_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """The positional ``key=value ...`` overrides of every command."""
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=help)


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    """The command as typed, for reports (``argv`` None: this process's arguments)."""
    return f"{prog} " + shlex.join(sys.argv[1:] if argv is None else list(argv))
