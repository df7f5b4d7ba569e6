"""Packing tokenised SFT examples into fixed-length rows (no compute spent on padding).

Each example is a triple of equal-length int/bool arrays ``input_ids``, ``targets`` (the next
token of each position, within the example) and ``loss_mask`` (1 on answer tokens). Examples
are assigned to rows of ``max_len`` slots by first-fit decreasing (longest first; each goes into
the first row with room, else a new row), never split across rows. A row holds its examples
back to back, in ascending example index, followed by padding. Per slot the packed batch gives

* ``segment_ids``: 1, 2, ... for the examples of the row in order, 0 on padding;
* ``positions``: the position inside the example (RoPE restarts at 0 in every segment).

Feeding ``segment_ids`` and ``positions`` to ``Qwen3ForCausalLM`` gives each token exactly the
attention and positions it has in the padded batch, so the masked next-token loss (sum over
answer tokens / number of answer tokens) and its gradient equal the padded computation.
Everything here is numpy and deterministic (ties in length are broken by example index).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["PackedBatch", "first_fit_decreasing", "pack_examples", "real_token_fraction"]


class PackedBatch(NamedTuple):
    """Rows of ``max_len`` slots; every array is [rows, max_len].

    ``rows[r]`` lists the example indices packed into row r (in slot order); ``dropped`` the
    indices of examples longer than ``max_len`` that were left out (``too_long="drop"``).
    """

    input_ids: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    rows: tuple[tuple[int, ...], ...]
    dropped: tuple[int, ...]


def first_fit_decreasing(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Bins of example indices, each bin's total length <= ``max_len``.

    Examples are taken longest first (ties: lower index first) and each goes into the first
    (oldest) bin with room, else opens a new bin. Each bin is returned in ascending index
    order. Every length must be in [1, max_len].
    """
    lengths = np.asarray(lengths, np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    bad = np.flatnonzero((lengths < 1) | (lengths > max_len))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"example {i} has length {int(lengths[i])}; lengths must be in [1, max_len={max_len}]"
        )
    order = np.argsort(-lengths, kind="stable")
    free = np.empty(len(lengths), np.int64)  # room left in each open bin
    bins: list[list[int]] = []
    for i in order:
        n = int(lengths[i])
        fits = np.flatnonzero(free[: len(bins)] >= n)
        if fits.size:
            b = int(fits[0])
        else:
            b = len(bins)
            bins.append([])
            free[b] = max_len
        bins[b].append(int(i))
        free[b] -= n
    return [sorted(b) for b in bins]


def pack_examples(
    examples: Sequence[Mapping[str, np.ndarray]],
    max_len: int,
    *,
    pad_id: int = 0,
    too_long: str = "error",
) -> PackedBatch:
    """Packs examples (dicts with ``input_ids``, ``targets``, ``loss_mask``) into rows.

    Args:
      examples: per example, three equal-length 1-D arrays.
      max_len: slots per row.
      pad_id: written to ``input_ids`` and ``targets`` on padding slots (their ``loss_mask``
        and ``segment_ids`` are 0).
      too_long: ``"error"`` (an example longer than ``max_len`` raises ValueError) or
        ``"drop"`` (it is left out and its index listed in ``PackedBatch.dropped``).
    """
    if too_long not in ("error", "drop"):
        raise ValueError(f"too_long must be 'error' or 'drop', got {too_long!r}")
    lengths = []
    for i, ex in enumerate(examples):
        shapes = {k: np.shape(ex[k]) for k in ("input_ids", "targets", "loss_mask")}
        if len(set(shapes.values())) != 1 or len(shapes["input_ids"]) != 1:
            raise ValueError(
                f"example {i}: input_ids, targets, loss_mask must be equal 1-D: {shapes}"
            )
        if shapes["input_ids"][0] == 0:
            raise ValueError(f"example {i} is empty")
        lengths.append(shapes["input_ids"][0])
    lengths = np.asarray(lengths, np.int64)
    too = np.flatnonzero(lengths > max_len)
    if too.size and too_long == "error":
        i = int(too[0])
        raise ValueError(
            f"example {i} has {int(lengths[i])} tokens > max_len={max_len} "
            f"({too.size} such examples); pass too_long='drop' to leave them out"
        )
    kept = np.flatnonzero(lengths <= max_len)
    bins = [[int(kept[j]) for j in b] for b in first_fit_decreasing(lengths[kept], max_len)]

    shape = (len(bins), max_len)
    out = {
        "input_ids": np.full(shape, pad_id, np.int32),
        "targets": np.full(shape, pad_id, np.int32),
        "loss_mask": np.zeros(shape, np.float32),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
    }
    for r, members in enumerate(bins):
        start = 0
        for seg, i in enumerate(members, start=1):
            n = int(lengths[i])
            cols = slice(start, start + n)
            for key in ("input_ids", "targets", "loss_mask"):
                out[key][r, cols] = np.asarray(examples[i][key])
            out["segment_ids"][r, cols] = seg
            out["positions"][r, cols] = np.arange(n)
            start += n
    return PackedBatch(
        **out,
        rows=tuple(tuple(b) for b in bins),
        dropped=tuple(int(i) for i in np.flatnonzero(lengths > max_len)),
    )


def real_token_fraction(segment_ids: np.ndarray) -> float:
    """Fraction of token slots holding a real token (``segment_ids != 0``; for a padded batch
    pass its attention mask)."""
    segment_ids = np.asarray(segment_ids)
    return float(np.count_nonzero(segment_ids) / segment_ids.size) if segment_ids.size else 0.0
