"""One process at a time per run directory: an exclusive ``flock`` on ``RUN_DIR/.run.lock``.

The lock is an OS lock, not a PID file: the kernel drops it when its holder exits, however it
exits (kill -9 included), so an interrupted run leaves nothing to clean up; the (empty) lock file
itself stays and means nothing on its own.
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import IO, Iterator

from hacbo_jax.trainer.config_fields import ConfigError

__all__ = ["LOCK_NAME", "RunLocked", "hold_run_lock", "try_lock"]

LOCK_NAME = ".run.lock"


class RunLocked(ConfigError):
    """Another live process holds the run directory's lock."""


def try_lock(path: Path) -> IO | None:
    """The open lock file, exclusively ``flock``-ed, or None when another process holds it.
    The lock lasts until the returned file is closed (or the process ends)."""
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


@contextlib.contextmanager
def hold_run_lock(run_dir: Path) -> Iterator[Path]:
    """Holds ``run_dir``'s lock (the directory must exist) until the block ends; RunLocked at
    once when another process holds it."""
    path = Path(run_dir) / LOCK_NAME
    f = try_lock(path)
    if f is None:
        raise RunLocked(
            f"output_dir = {str(run_dir)!r}: another process holds this run directory (lock "
            f"{path}); wait for it to finish or stop it, or choose another output_dir"
        )
    try:
        yield path
    finally:
        f.close()  # closing the last descriptor releases the flock
