"""Training checkpoints: an orbax ``CheckpointManager`` holding one pytree of arrays plus JSON.

Each checkpoint step is a directory ``RUN_DIR/checkpoints/<step>/`` with two orbax items:

- ``state``: any pytree of arrays (params, optimiser state -- optax NamedTuples included, with
  the controller state inside the chain -- and the RNG key, typed or raw), written with orbax's
  standard handler, so dtypes and values come back bit-exact;
- ``meta``: a JSON object (step, data position, micro-dev buffer state, counters), written with
  orbax's JSON handler.

Orbax writes into a temporary directory and renames it when complete, so a crash mid-save leaves
no half-written step that :meth:`Checkpointer.latest_step` would pick up; ``keep`` bounds the
number of steps kept on disk (oldest deleted first).  Restoring needs an *abstract target*: the
same pytree (or its ``jax.ShapeDtypeStruct`` skeleton, e.g. from ``jax.eval_shape``); the stored
tree is compared with it first so that a checkpoint from another model shape or optimiser is
reported leaf by leaf instead of failing deep inside tensorstore.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from hacbo_jax.trainer.logs import jsonable

__all__ = ["CheckpointError", "Checkpointer"]

PyTree = Any


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete/corrupt or does not match the restore target."""


def _leaf_table(tree: PyTree) -> dict[str, Any]:
    """``"a/b/0/c" -> leaf``: NamedTuple fields and dict keys both become plain names, because
    orbax stores NamedTuples as mappings and drops empty nodes (``optax.EmptyState``)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in leaves}


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax, tensorstore and asyncio log every failed read at ERROR level (hundreds of lines
    for one corrupt file); a failed restore is reported by :class:`CheckpointError` instead, so
    their loggers are silenced while restoring."""
    loggers = [logging.getLogger(name) for name in ("absl", "orbax", "asyncio", "jax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _is_key(dtype) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


class Checkpointer:
    """Save / restore ``(state pytree, metadata dict)`` at integer steps under ``directory``.

    Args:
      directory: the checkpoint root (``RUN_DIR/checkpoints``); created if missing.
      keep: how many of the most recent steps to keep on disk.
      async_save: let :meth:`save` return while the arrays are written in the background
        (device->host copy happens before it returns); :meth:`wait` / :meth:`close` block.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep={keep}: must be >= 1")
        self.directory = Path(directory).absolute()
        # Explicit handlers: a manager opened on an existing directory (a resumed run) must know
        # how to read each item's metadata before anything was saved through it.
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
            ),
        )

    # -- queries --------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Complete checkpoint steps on disk, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete step, or None when there is no checkpoint."""
        return self._manager.latest_step()

    # -- save / restore -------------------------------------------------------------------
    def save(self, step: int, state: PyTree, metadata: Mapping[str, Any] | None = None) -> bool:
        """Write ``state`` (arrays) and ``metadata`` (JSON; ``step`` added) as checkpoint ``step``.

        Returns False, writing nothing, when ``step`` is already saved (e.g. the final save of a
        run that just checkpointed that step); older steps beyond ``keep`` are deleted.
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        meta = jsonable(dict(metadata or {}))
        meta["step"] = step
        return self._manager.save(
            step,
            force=True,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )

    def restore(
        self, step: int | None = None, *, abstract_target: PyTree
    ) -> tuple[PyTree, dict[str, Any]]:
        """Return ``(state, metadata)`` of ``step`` (default: latest), shaped like the target.

        ``abstract_target`` is the pytree saved (or ``jax.eval_shape`` of it / a tree of
        ``jax.ShapeDtypeStruct``); its structure, shapes and dtypes must match the stored ones
        exactly (no silent casting or padding), otherwise CheckpointError lists the differences.
        Restored arrays take the target's sharding when it has one.
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint in {self.directory}")
        elif step not in self._manager.all_steps():
            raise CheckpointError(
                f"no checkpoint step {step} in {self.directory}; available: {self.all_steps()}"
            )
        where = f"checkpoint step {step} in {self.directory}"
        remedy = (
            f"; delete {self.directory / str(step)} or restore another step "
            f"(available: {self.all_steps()})"
        )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_target)
        try:
            with _quiet_orbax():
                self._check_matches(step, abstract, where, remedy)
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
        except CheckpointError:
            raise
        except Exception as e:  # orbax/tensorstore raise many types; say which file is bad
            raise CheckpointError(
                f"{where} is incomplete or corrupt and cannot be read "
                f"({type(e).__name__}: {e}){remedy}"
            ) from e
        return restored["state"], dict(restored["meta"])

    def _check_matches(self, step: int, abstract: PyTree, where: str, remedy: str) -> None:
        try:
            stored = self._manager.item_metadata(step)["state"]
        except Exception as e:
            raise CheckpointError(
                f"{where} is incomplete or corrupt: its metadata cannot be "
                f"read ({type(e).__name__}: {e}){remedy}"
            ) from e
        stored = getattr(stored, "tree", stored)
        if stored is None:
            raise CheckpointError(
                f"{where} is incomplete or corrupt: no array metadata "
                f"(state/_METADATA missing){remedy}"
            )
        have, want = _leaf_table(stored), _leaf_table(abstract)
        problems = [f"missing in checkpoint: {k}" for k in want if k not in have]
        problems += [f"not in restore target: {k}" for k in have if k not in want]
        for name in want.keys() & have.keys():
            w, h = want[name], have[name]
            if _is_key(w.dtype):
                continue  # typed PRNG keys are stored as their raw uint32 data
            if tuple(h.shape) != tuple(w.shape) or np.dtype(h.dtype) != np.dtype(w.dtype):
                problems.append(
                    f"{name}: stored {tuple(h.shape)} {np.dtype(h.dtype)}, "
                    f"expected {tuple(w.shape)} {np.dtype(w.dtype)}"
                )
        if problems:
            shown = sorted(problems)[:20]
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise CheckpointError(
                f"{where} does not match the restore target (a different model shape, dtype or "
                f"optimiser/controller?):\n  " + "\n  ".join(shown) + more
            )

    # -- lifecycle ------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until background saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
