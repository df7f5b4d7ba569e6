"""Multi-host plumbing: starting ``jax.distributed`` and feeding each host its part of a batch.

In a multi-host (multi-controller) run every process runs the same program on the same global
arrays; a process can only create the shards that live on its own devices. The training loop
therefore draws the *global* batch indices (the sampler is seeded, so every process draws the
same), and each process tokenises-and-gathers only the rows whose shards it holds
(:func:`local_rows`), then assembles the global array with
``jax.make_array_from_process_local_data``. With one process this is an ordinary
``device_put`` of the whole batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

__all__ = ["maybe_initialize", "wants_distributed", "local_rows", "global_batch"]

# Setting any of these asks for jax.distributed.initialize(); the JAX_* ones are read by JAX
# itself (coordinator host:port, number of processes, this process's id); HACBO_DISTRIBUTED=1
# asks for JAX's cluster auto-detection (SLURM, Open MPI, Kubernetes, Cloud TPU).
_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
_ENV_FLAG = "HACBO_DISTRIBUTED"


def wants_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """True when the environment asks for a multi-process run (see module constants)."""
    env = os.environ if environ is None else environ
    return bool(env.get(_ENV_COORDINATOR)) or env.get(_ENV_FLAG, "0") not in ("", "0")


def maybe_initialize(environ: Mapping[str, str] | None = None) -> bool:
    """Calls ``jax.distributed.initialize()`` once, if the environment asks for it.

    Must run before anything touches a device. ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` are
    passed when set; otherwise JAX detects them from the cluster environment. Returns whether a
    multi-process runtime is (now) active.
    """
    env = os.environ if environ is None else environ
    if not wants_distributed(env):
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs: dict[str, Any] = {}
    if env.get(_ENV_COORDINATOR):
        kwargs["coordinator_address"] = env[_ENV_COORDINATOR]
    for var, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if env.get(var):
            kwargs[key] = int(env[var])
    jax.distributed.initialize(**kwargs)
    return True


def local_rows(
    sharding: NamedSharding,
    global_shape: tuple[int, ...],
    axis: int,
    *,
    process_index: int | None = None,
    process_of: Callable[[jax.Device], int] | None = None,
) -> slice:
    """The contiguous range of ``axis`` whose shards live on ``process_index``'s devices.

    ``process_index`` defaults to this process and ``process_of`` (device -> its process) to
    ``device.process_index``; both are arguments so the multi-host split can be exercised in
    one process. The rows of one process must be contiguous (true for meshes from
    :func:`hacbo_jax.trainer.sharding.make_mesh`, which keep a process's devices together); a layout
    where they are not raises ValueError.
    """
    process = jax.process_index() if process_index is None else process_index
    owner = (lambda device: device.process_index) if process_of is None else process_of
    index_map = sharding.devices_indices_map(tuple(global_shape))
    ranges = {
        index[axis].indices(global_shape[axis])[:2]
        for device, index in index_map.items()
        if owner(device) == process
    }
    if not ranges:
        raise ValueError(f"process {process} holds no shard of this sharding")
    starts, stops = zip(*sorted(ranges))
    covered = sum(stop - start for start, stop in ranges)
    lo, hi = min(starts), max(stops)
    if covered != hi - lo:
        raise ValueError(
            f"process {process}'s rows along axis {axis} are not contiguous: {sorted(ranges)}"
        )
    return slice(lo, hi)


def global_batch(local_data: Any, sharding: NamedSharding, axis: int, global_rows: int) -> Any:
    """Global arrays from this process's rows (a pytree of numpy arrays).

    ``local_data`` leaves hold the rows :func:`local_rows` names for this process along
    ``axis`` (all ``global_rows`` of them in a single-process run); the global shape is the
    local one with ``axis`` of size ``global_rows``.
    """

    def assemble(x):
        x = np.asarray(x)
        shape = x.shape[:axis] + (global_rows,) + x.shape[axis + 1 :]
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(assemble, local_data)
