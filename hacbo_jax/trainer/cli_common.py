"""Pieces every command line of the training stack shares (light: no JAX import)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

__all__ = [
    "ArgumentParser",
    "EXPECTED_ERRORS",
    "add_overrides_argument",
    "add_overwrite_argument",
    "check_output_target",
    "cli_errors",
    "cli_main",
    "command_line",
    "usage_error",
]

#: The errors of bad input every entry point reports as ``PROG: error: ...`` + exit 2 (no
#: traceback): ValueError covers ConfigError, DataError, CheckpointError and RunDirError;
#: OSError covers FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError and
#: a full disk. Set ``HACBO_TRACEBACK=1`` to see the traceback instead (debugging).
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def usage_error(prog: str, error: Exception) -> int:
    """Prints ``PROG: error: ...`` (argparse's format) and returns exit status 2."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


def repeated_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """The options of ``parser`` that take a value and appear more than once in ``argv``
    (``--out a --out=b``): argparse would keep the last one silently."""
    counts: dict[str, int] = {}
    for token in argv:
        if token == "--":
            break
        if not token.startswith("-"):
            continue
        action = parser._option_string_actions.get(token.split("=", 1)[0])
        if action is None or action.nargs == 0 or isinstance(action, argparse._AppendAction):
            continue  # a flag may be repeated harmlessly; an appending option is meant to be
        name = action.option_strings[-1]
        counts[name] = counts.get(name, 0) + 1
    return [name for name, n in counts.items() if n > 1]


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, refusing an option that takes a value given twice (argparse keeps the
    last one silently, as YAML would a duplicate key): ``PROG: error: ...`` and exit 2."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        argv = sys.argv[1:] if args is None else list(args)
        repeated = repeated_options(self, argv)
        if repeated:
            self.error(
                "; ".join(f"option {name} given twice" for name in repeated)
                + " (argparse would keep the last silently); give each option once"
            )
        return super().parse_known_args(args, namespace)


def add_overrides_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """The positional ``key=value ...`` overrides of every command."""
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=help)


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    """The command as typed, for reports (``argv`` None: this process's arguments)."""
    return f"{prog} " + shlex.join(sys.argv[1:] if argv is None else list(argv))


def _describe(error: BaseException) -> str:
    """One line for ``error``: OSErrors as 'STRERROR: PATH' (their str() is '[Errno 2] ...')."""
    if isinstance(error, OSError) and error.strerror:
        where = error.filename if error.filename is not None else ""
        if error.filename2 is not None:
            where = f"{where} -> {error.filename2}"
        return f"{where}: {error.strerror}" if where != "" else error.strerror
    return str(error) or type(error).__name__


class cli_errors(contextlib.AbstractContextManager):
    """``with cli_errors(prog) as errors: ...`` turns an expected error (``EXPECTED_ERRORS``)
    raised inside into ``PROG: error: ...`` on stderr; ``errors.status`` is then 2 (else None).

        with cli_errors(prog) as errors:
            return run(args)
        return errors.status
    """

    def __init__(self, prog: str, errors: Iterable[type[BaseException]] = EXPECTED_ERRORS):
        self.prog = prog
        self.errors = tuple(errors)
        self.status: int | None = None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or not isinstance(exc, self.errors) or os.environ.get("HACBO_TRACEBACK"):
            return False
        self.status = usage_error(self.prog, _describe(exc))
        return True


def cli_main(main: Callable[..., int]) -> Callable[..., int]:
    """Decorates a ``main(argv=None, *, prog=DEFAULT, ...)``: an expected error raised anywhere
    inside it (argument checks or the work itself) becomes ``PROG: error: ...`` + return 2.
    argparse's own usage errors still exit 2 through SystemExit, as before."""
    default_prog = inspect.signature(main).parameters["prog"].default

    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None, *args: Any, **kwargs: Any) -> int:
        with cli_errors(kwargs.get("prog", default_prog)) as errors:
            return main(argv, *args, **kwargs)
        return errors.status  # type: ignore[return-value]

    return wrapper


def add_overwrite_argument(parser: argparse.ArgumentParser, what: str = "the output") -> None:
    """``--overwrite``, the one flag every writing tool takes to replace an earlier output."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace {what} if it already exists (default: refuse a non-empty target)",
    )


def check_output_target(
    path: str | Path,
    *,
    option: str = "--out",
    overwrite: bool = False,
    files: Sequence[str] | None = None,
) -> Path:
    """Checks, before any work, that ``path`` can take a tool's output; returns it.

    ``path`` must be a directory or not exist yet (a file is refused: exit 2, not a traceback).
    Without ``overwrite`` it must be empty, or, when ``files`` names the outputs the tool writes
    into a directory it shares with others, hold none of them."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a file, not a directory")
    if overwrite or not path.is_dir():
        return path
    if files is None:
        if any(path.iterdir()):
            raise ValueError(
                f"{option} {str(path)!r} is not empty (an earlier output?); pass --overwrite to "
                "write into it, or choose another directory"
            )
    else:
        existing = [name for name in files if (path / name).exists()]
        if existing:
            raise ValueError(
                f"{option} {str(path)!r} already holds {', '.join(existing)}; pass --overwrite to "
                "replace them, or choose another directory"
            )
    return path
