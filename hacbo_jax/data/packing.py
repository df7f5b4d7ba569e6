"""Packing tokenised SFT examples into fixed-length rows, and the training run's packed batches.

Part 1, the packing itself (:func:`pack_examples`).

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

Part 2, the run's packed batches (``data.packing: true``, :class:`StepPacker`).

The sampler chooses each optimiser step's examples exactly as without packing
(:class:`~hacbo_jax.data.gsm8k.EpochSampler`); only their layout changes. The step's examples
are cut out of their right-padded rows (:class:`~hacbo_jax.data.gsm8k.SFTArrays`: each keeps
its own ``input_ids``, ``targets`` and ``loss_mask``, so no target crosses an example boundary)
and packed by :func:`hacbo_jax.data.packing.pack_examples` (first-fit decreasing, never splitting an
example) into rows with segment ids and per-segment positions
(:class:`~hacbo_jax.trainer.step.PackedRows`). The model's packed forward attends within a
segment only, so the step's loss (sum of answer-token NLL / answer tokens over all micro-batches)
and its gradient equal the padded step's.

Fixed shapes. A packed step is ``accumulation_steps`` micro-batches of ``rows`` packed rows
each, the same for every step, so the step compiles once. They are the fewest that fit EVERY
step of the run: the sampler's order is a pure function of (seed, epoch), so all the run's
batches are known before it starts; :meth:`StepPacker.for_run` packs each of them (first-fit
decreasing over lengths only, cheap) and takes the largest row count N. A micro-batch holds at
most ``optim.micro_batch_size`` rows (the padded micro-batch's memory) and a multiple of the
devices that split it; among those layouts with at most twice the fewest micro-batches, the
step gets the one with the fewest slots ``accumulation_steps x rows >= N`` (ties: fewer
micro-batches; e.g. N = 28 rows with micro-batches of at most 16: 2 x 14). Steps needing fewer rows get empty rows (segment 0, loss weight 0). The batch
size would also be a valid bound and needs no look-ahead, but it computes exactly as many token
slots as padding does, which is what packing is meant to avoid. The micro-batch count may
differ from the padded one (``optim.batch_size / micro_batch_size``): the loss sums over
micro-batches before it divides, so how rows are split between them does not change it. Row r
of the step's packing goes to micro-batch r mod ``accumulation_steps``.

Row buckets (``data.packing_shapes`` = S, at most 4). One fixed shape must fit the run's
fullest step, so every other step computes empty rows (86% real tokens on GSM8K at 512 for
the paper's 64-example steps). With S > 1 the packer keeps the micro-batch count and offers S
row counts per micro-batch (the largest is the fixed shape's); each step takes the smallest
that fits it. The S counts are chosen to minimise the run's total slots (exhaustively over the
row counts the run's steps need). Each count is one more compiled shape of the step (jit
traces it on first use), so S trades compile time for computed slots.

Micro-dev batches and evaluation stay padded.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from hacbo_jax.data.gsm8k import EpochSampler, SFTArrays

__all__ = [
    "PackedBatch",
    "StepPacker",
    "describe",
    "example_lengths",
    "first_fit_decreasing",
    "pack_examples",
    "pack_split",
    "real_token_fraction",
]


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


# ---- The run's packed batches ------------------------------------------------------------

def example_lengths(arrays: SFTArrays) -> np.ndarray:
    """Tokens of each (right-padded, possibly truncated) example: its attention-mask sum."""
    return arrays.attention_mask.sum(axis=1).astype(np.int64)


def _pieces(arrays: SFTArrays, indices: np.ndarray) -> list[dict]:
    """The examples ``indices`` without their padding, as ``pack_examples`` takes them."""
    indices = np.asarray(indices)
    lengths = arrays.attention_mask[indices].sum(axis=1)
    return [
        {
            "input_ids": arrays.input_ids[i, :n],
            "targets": arrays.targets[i, :n],
            "loss_mask": arrays.loss_mask[i, :n],
        }
        for i, n in zip(indices.tolist(), lengths.tolist(), strict=True)
    ]


def pack_split(arrays: SFTArrays, max_len: int, pad_id: int = 0):
    """The whole split packed at once (:func:`hacbo_jax.data.packing.pack_examples`): the packer's
    best case, e.g. for its real-token fraction over a data set."""
    return pack_examples(_pieces(arrays, np.arange(len(arrays))), max_len, pad_id=pad_id)


@dataclasses.dataclass(frozen=True)
class StepPacker:
    """Packs a step's examples into ``accumulation_steps`` x ``rows`` rows of ``max_len``.

    Attributes:
      arrays: the tokenised training split (right-padded, ``max_len`` columns).
      pad_id: written to ``input_ids`` / ``targets`` of padding slots.
      accumulation_steps: packed micro-batches per optimiser step (fixed for the run).
      rows: packed rows per micro-batch (fixed for the run: :meth:`for_run`).
      real_fraction: real tokens / computed token slots over the run's steps (set by
        :meth:`for_run`; the padded layout's would be the mean length / max_len).
      row_buckets: the row counts per micro-batch a step may take, ascending, the last =
        ``rows`` (``()`` = ``rows`` only); a step takes the smallest that fits it.
    """

    arrays: SFTArrays
    pad_id: int
    accumulation_steps: int
    rows: int
    real_fraction: float | None = None
    row_buckets: tuple[int, ...] = ()

    @property
    def shapes(self) -> tuple[int, ...]:
        """The row counts per micro-batch this packer produces (each a compiled shape)."""
        return self.row_buckets or (self.rows,)

    @property
    def max_len(self) -> int:
        return self.arrays.input_ids.shape[1]

    @classmethod
    def for_run(
        cls,
        arrays: SFTArrays,
        *,
        batch_size: int,
        seed: int,
        total_steps: int,
        max_rows: int,
        row_multiple: int = 1,
        pad_id: int = 0,
        max_shapes: int = 1,
    ) -> StepPacker:
        """The packer whose micro-batches of at most ``max_rows`` rows fit every one of the
        run's ``total_steps`` batches (see the module docstring).

        Replays the sampler (``EpochSampler(len(arrays), batch_size, seed=seed)``) from the
        start of the run. ``row_multiple`` (the devices splitting a micro-batch) must divide
        ``max_rows``; it divides ``rows`` and every bucket. ``max_shapes``: at most this many
        row counts per micro-batch (the module docstring's row buckets).
        """
        if min(total_steps, max_rows, row_multiple, max_shapes) < 1 or max_rows % row_multiple:
            raise ValueError(
                f"total_steps={total_steps}, max_rows={max_rows}, row_multiple={row_multiple} "
                f"and max_shapes={max_shapes} must be >= 1, with max_rows a multiple of "
                "row_multiple"
            )
        lengths = example_lengths(arrays)
        max_len = arrays.input_ids.shape[1]
        sampler = EpochSampler(len(arrays), batch_size, seed=seed)
        per_step, tokens = [], 0
        for _ in range(total_steps):
            batch_lengths = lengths[sampler.next_indices()]
            per_step.append(len(first_fit_decreasing(batch_lengths, max_len)))
            tokens += int(batch_lengths.sum())
        needed = max(per_step)
        # The fewest slots (then the fewest micro-batches) among the layouts that fit: rows a
        # multiple of row_multiple and at most max_rows, accumulation_steps x rows >= needed,
        # and at most twice the fewest micro-batches (more, smaller ones would save a few slots
        # at the price of a longer sequential accumulation of smaller matmuls).
        fewest = math.ceil(needed / max_rows)
        layouts = []
        for accumulation_steps in range(fewest, min(2 * fewest, needed) + 1):
            rows = math.ceil(math.ceil(needed / accumulation_steps) / row_multiple) * row_multiple
            layouts.append((accumulation_steps * rows, accumulation_steps, rows))
        _, accumulation_steps, rows = min(layouts)
        # rows each step needs per micro-batch, rounded up to the row multiple
        step_rows = [
            math.ceil(math.ceil(n / accumulation_steps) / row_multiple) * row_multiple
            for n in per_step
        ]
        buckets = _best_buckets(step_rows, rows, max_shapes)
        slots = sum(min(b for b in buckets if b >= r) for r in step_rows)
        real = tokens / (slots * accumulation_steps * max_len)
        return cls(
            arrays, pad_id, accumulation_steps, rows, real, buckets if len(buckets) > 1 else ()
        )

    def pack(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The step's examples ``indices`` as :class:`~hacbo_jax.trainer.step.PackedRows`
        fields, each [accumulation_steps, rows, max_len] (numpy).

        Raises ValueError when they need more than ``accumulation_steps * rows`` rows (not for
        the run's own batches when built by :meth:`for_run`).
        """
        packed = pack_examples(_pieces(self.arrays, indices), self.max_len, pad_id=self.pad_id)
        used = len(packed.rows)
        rows = next((b for b in self.shapes if self.accumulation_steps * b >= used), self.rows)
        total = self.accumulation_steps * rows
        if used > total:
            raise ValueError(
                f"the step's {len(indices)} examples need {used} packed rows of {self.max_len} "
                f"tokens, more than the {self.accumulation_steps} x {self.rows} rows of a step"
            )
        out = {}
        for key in ("input_ids", "segment_ids", "positions", "targets", "loss_mask"):
            x = getattr(packed, key)
            fill = self.pad_id if key in ("input_ids", "targets") else 0
            x = np.concatenate([x, np.full((total - used, self.max_len), fill, x.dtype)])
            # row r -> micro-batch r mod accum: the fullest rows spread over the micro-batches
            out[key] = x.reshape(rows, self.accumulation_steps, self.max_len).swapaxes(0, 1)
        return out


def _best_buckets(step_rows: list[int], rows: int, max_shapes: int) -> tuple[int, ...]:
    """At most ``max_shapes`` row counts, the largest = ``rows``, minimising the sum over
    steps of the smallest count that fits each step (exhaustive over the needed counts)."""
    candidates = sorted(set(step_rows) - {rows})
    best: tuple[int, int, tuple[int, ...]] = (len(step_rows) * rows, 1, (rows,))
    for k in range(1, min(max_shapes - 1, len(candidates)) + 1):
        for chosen in itertools.combinations(candidates, k):
            buckets = (*chosen, rows)
            cost = sum(min(b for b in buckets if b >= r) for r in step_rows)
            best = min(best, (cost, len(buckets), buckets))  # ties: fewer shapes
    return best[2]


def describe(packer: StepPacker, *, padded_fraction: float) -> str:
    """One line for the run's output: rows per step and the real-token fractions."""
    shapes = "/".join(str(r) for r in packer.shapes)
    return (
        f"packing: {packer.accumulation_steps} x {shapes} rows of {packer.max_len} tokens "
        f"per step; real tokens {packer.real_fraction:.1%} of the computed slots "
        f"(padded: {padded_fraction:.1%})"
    )
