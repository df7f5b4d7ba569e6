"""Device meshes and partition rules for data-parallel and fully sharded (FSDP) training.

JAX's own sharding does the work: a :class:`jax.sharding.Mesh` with two named axes,
``("data", "fsdp")``, :class:`~jax.sharding.NamedSharding` s on every array, and ``jax.jit``
inserting the collectives (all-gathers of sharded params, reductions of gradients). This module
only decides *which* array axis goes on *which* mesh axis:

- a batch is split along its example axis over ``("data", "fsdp")`` jointly (FSDP devices also
  see different examples; ZeRO-3 style), so every device holds ``micro_batch / (data * fsdp)``
  rows;
- a parameter is split along one of its axes over ``"fsdp"`` and replicated over ``"data"``;
  which axis is chosen by regex rules on the leaf's path (e.g. :data:`hacbo_jax.trainer.recipes.QWEN3_RULES`), falling back to
  :func:`fsdp_spec` -- the largest axis divisible by the fsdp size, or replicated when the
  tensor is small;
- optimiser states mirror the params tree (optax's ``mu``/``nu`` keep the param's path as their
  path suffix), so the same rules, searched in the full path, shard each moment like its
  parameter; the controllers' [B] / [B, M] arrays and scalars match no rule and are small, hence
  replicated. A reduction over a sharded array inside ``jit`` is a global reduction, so the
  controllers' per-block sums need no change.

Paths are the leaf's key path joined by ``"/"`` (dict keys, NamedTuple field names, sequence
indices), e.g. ``opt_state/inner_state/1/0/mu/model/layers/3/mlp/up_proj/kernel``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec


__all__ = [
    "DATA_AXIS",
    "FSDP_AXIS",
    "BATCH_AXES",
    "PartitionRule",
    "make_mesh",
    "resolve_mesh_shape",
    "fsdp_spec",
    "partition_specs",
    "named_shardings",
    "shard_pytree",
    "abstract_with_shardings",
    "batch_spec",
    "per_device_bytes",
]

PyTree = Any
DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# The mesh axes an example axis is split over (data parallel x FSDP).
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

# (regex searched in the leaf's "/"-joined path, spec for that leaf); first match wins.
PartitionRule = tuple[str, PartitionSpec]


# ---------------------------------------------------------------------------------------------
# Meshes
# ---------------------------------------------------------------------------------------------


def resolve_mesh_shape(data: int, fsdp: int, device_count: int) -> tuple[int, int]:
    """``(data, fsdp)`` with ``data=-1`` resolved to ``device_count // fsdp``, validated.

    The mesh may use fewer devices than are present (the first ``data * fsdp`` ones; a 1x1 mesh
    on a multi-GPU host is an ordinary single-device run), never more.

    Raises:
      ValueError: naming ``mesh.data``, ``mesh.fsdp`` and the device count when a size is not a
        positive int (or -1 for data), or the mesh needs more devices than there are.
    """
    for name, value, allowed in (
        ("mesh.data", data, "a positive int, or -1 for all devices"),
        ("mesh.fsdp", fsdp, "a positive int"),
    ):
        ok = (
            isinstance(value, (int, np.integer))
            and not isinstance(value, bool)
            and (value >= 1 or (name == "mesh.data" and value == -1))
        )
        if not ok:
            raise ValueError(f"{name}={value!r}: must be {allowed}")
    if fsdp > device_count:
        raise ValueError(f"mesh.fsdp={fsdp} needs more devices than the {device_count} present")
    if data == -1:
        if device_count % fsdp:
            raise ValueError(
                f"mesh.data=-1 (all devices) with mesh.fsdp={fsdp}: the {device_count} devices "
                f"present are not a multiple of mesh.fsdp"
            )
        data = device_count // fsdp
    if data * fsdp > device_count:
        raise ValueError(
            f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} devices, but only "
            f"{device_count} are present (jax.device_count()); use sizes whose product is at "
            f"most {device_count}, or mesh.data=-1 for all devices"
        )
    return int(data), int(fsdp)


def make_mesh(data: int = 1, fsdp: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over the first ``data * fsdp`` of ``devices`` (default: all).

    ``data=-1`` takes all devices. Axes are ``Auto`` (GSPMD-style propagation: shardings of the
    inputs/outputs are given, XLA chooses the rest). In a multi-process run the mesh must span
    every device, since every process takes part in every step.
    """
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = resolve_mesh_shape(data, fsdp, len(devices))
    if jax.process_count() > 1 and data * fsdp != len(devices):
        raise ValueError(
            f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} devices, but a multi-process "
            f"run ({jax.process_count()} processes) must use all {len(devices)} devices"
        )
    return jax.make_mesh(
        (data, fsdp),
        (DATA_AXIS, FSDP_AXIS),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices[: data * fsdp],
    )


# ---------------------------------------------------------------------------------------------
# Partition specs
# ---------------------------------------------------------------------------------------------


def fsdp_spec(
    shape: Sequence[int], fsdp_size: int, *, min_elements: int = 2**16, axis_name: str = FSDP_AXIS
) -> PartitionSpec:
    """Shard the largest axis of ``shape`` divisible by ``fsdp_size`` over ``axis_name``.

    Replicated (``PartitionSpec()``) when ``fsdp_size`` is 1, the tensor has fewer than
    ``min_elements`` elements (gathering it would cost more than storing it), or no axis is
    divisible. Ties go to the leading axis.
    """
    shape = tuple(int(d) for d in shape)
    if fsdp_size <= 1 or math.prod(shape) < min_elements:
        return PartitionSpec()
    candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0 and d >= fsdp_size]
    if not candidates:
        return PartitionSpec()
    best = max(candidates, key=lambda i: (shape[i], -i))
    return PartitionSpec(*(axis_name if i == best else None for i in range(len(shape))))


def _axis_sizes(mesh_axes: Any, axes: Any) -> int:
    names = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh_axes[n] for n in names)


def _fits(spec: PartitionSpec, shape: tuple[int, ...], mesh_axes: dict[str, int]) -> bool:
    if len(spec) > len(shape):
        return False
    return all(
        axes is None or shape[i] % _axis_sizes(mesh_axes, axes) == 0 for i, axes in enumerate(spec)
    )


def partition_specs(
    tree: PyTree,
    mesh_axes: Mesh | AbstractMesh | dict[str, int],
    rules: Sequence[PartitionRule] = (),
    *,
    min_elements: int = 2**16,
    fallback: Callable[[tuple[int, ...]], PartitionSpec] | None = None,
) -> PyTree:
    """A tree of PartitionSpec for ``tree`` (arrays or ``jax.ShapeDtypeStruct`` s).

    Each leaf takes the spec of the first rule whose regex is found (``re.search``) in its path
    (the "/"-joined ``jax.tree_util.keystr``, as the controllers' label rules see it) and whose
    sharded axes divide the leaf's dimensions; otherwise
    ``fallback(shape)``, by default :func:`fsdp_spec` with the mesh's fsdp size and
    ``min_elements``. Scalars are always replicated. Leaves without a shape (None, Python
    numbers) get ``PartitionSpec()``.

    Args:
      tree: any pytree; optimiser states that mirror the params tree are matched by their
        path suffix, so one rule set covers params and their moments.
      mesh_axes: the mesh (concrete or abstract, or a ``{axis name: size}`` dict) the specs
        are meant for.
      rules: ``(regex, PartitionSpec)`` pairs, e.g. :data:`hacbo_jax.trainer.recipes.QWEN3_RULES`.
    """
    sizes = dict(mesh_axes.shape) if hasattr(mesh_axes, "shape") else dict(mesh_axes)
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
    if fallback is None:
        fsdp = sizes.get(FSDP_AXIS, 1)
        fallback = lambda shape: fsdp_spec(shape, fsdp, min_elements=min_elements)

    def spec_for(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        if not shape:
            return PartitionSpec()
        name = jax.tree_util.keystr(tuple(path), simple=True, separator="/")
        for pattern, spec in compiled:
            if pattern.search(name) and _fits(spec, shape, sizes):
                return spec
        return fallback(shape)

    return jax.tree_util.tree_map_with_path(spec_for, tree)


def batch_spec(ndim: int, example_axis: int = 0) -> PartitionSpec:
    """Split axis ``example_axis`` of an ``ndim``-D batch array over ``("data", "fsdp")``."""
    return PartitionSpec(*(BATCH_AXES if i == example_axis else None for i in range(ndim)))


# ---------------------------------------------------------------------------------------------
# Shardings on trees
# ---------------------------------------------------------------------------------------------


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def named_shardings(mesh: Mesh, specs: PyTree) -> PyTree:
    """``NamedSharding(mesh, spec)`` for every PartitionSpec leaf of ``specs``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def shard_pytree(tree: PyTree, shardings: PyTree) -> PyTree:
    """``tree`` placed with ``shardings`` (a matching tree, or one sharding for every leaf).

    Single process only: each process would need the whole value (use
    ``train.distributed.global_array`` for per-host data).
    """
    return jax.device_put(tree, shardings)


def abstract_with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
    """``jax.ShapeDtypeStruct`` s of ``tree`` (arrays or abstract) carrying ``shardings``.

    Typical uses: ``jax.jit(init, out_shardings=...)`` targets and the abstract target of a
    checkpoint restore onto a (possibly different) mesh.
    """
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def per_device_bytes(tree: PyTree, shardings: PyTree) -> int:
    """Bytes one device holds for ``tree`` (arrays or ShapeDtypeStruct) under ``shardings``.

    From the shard shapes (``sharding.shard_shape``); with even splits every device holds the
    same amount.
    """
    total = 0
    for leaf, sharding in zip(
        jax.tree.leaves(tree),
        jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)),
    ):
        shape = sharding.shard_shape(tuple(leaf.shape))
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total
