"""Packed training batches (``data.packing: true``): a step's examples in rows of ``max_len``.

The sampler chooses each optimiser step's examples exactly as without packing
(:class:`~hacbo_jax.training.data.EpochSampler`); only their layout changes. The step's examples
are cut out of their right-padded rows (:class:`~hacbo_jax.training.data.SFTArrays`: each keeps
its own ``input_ids``, ``targets`` and ``loss_mask``, so no target crosses an example boundary)
and packed by :func:`hacbo_jax.packing.pack_examples` (first-fit decreasing, never splitting an
example) into rows with segment ids and per-segment positions
(:class:`~hacbo_jax.training.step.PackedRows`). The model's packed forward attends within a
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

Micro-dev batches and evaluation stay padded.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from hacbo_jax.packing import first_fit_decreasing, pack_examples
from hacbo_jax.training.data import EpochSampler, SFTArrays

__all__ = ["StepPacker", "describe", "example_lengths", "pack_split"]


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
    """The whole split packed at once (:func:`hacbo_jax.packing.pack_examples`): the packer's
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
    """

    arrays: SFTArrays
    pad_id: int
    accumulation_steps: int
    rows: int
    real_fraction: float | None = None

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
    ) -> StepPacker:
        """The packer whose micro-batches of at most ``max_rows`` rows fit every one of the
        run's ``total_steps`` batches (see the module docstring).

        Replays the sampler (``EpochSampler(len(arrays), batch_size, seed=seed)``) from the
        start of the run. ``row_multiple`` (the devices splitting a micro-batch) must divide
        ``max_rows``; it divides ``rows``.
        """
        if min(total_steps, max_rows, row_multiple) < 1 or max_rows % row_multiple:
            raise ValueError(
                f"total_steps={total_steps}, max_rows={max_rows} and row_multiple="
                f"{row_multiple} must be >= 1, with max_rows a multiple of row_multiple"
            )
        lengths = example_lengths(arrays)
        max_len = arrays.input_ids.shape[1]
        sampler = EpochSampler(len(arrays), batch_size, seed=seed)
        needed, tokens = 0, 0
        for _ in range(total_steps):
            batch_lengths = lengths[sampler.next_indices()]
            needed = max(needed, len(first_fit_decreasing(batch_lengths, max_len)))
            tokens += int(batch_lengths.sum())
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
        slots = total_steps * accumulation_steps * rows * max_len
        return cls(arrays, pad_id, accumulation_steps, rows, tokens / slots)

    def pack(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The step's examples ``indices`` as :class:`~hacbo_jax.training.step.PackedRows`
        fields, each [accumulation_steps, rows, max_len] (numpy).

        Raises ValueError when they need more than ``accumulation_steps * rows`` rows (not for
        the run's own batches when built by :meth:`for_run`).
        """
        packed = pack_examples(_pieces(self.arrays, indices), self.max_len, pad_id=self.pad_id)
        total = self.accumulation_steps * self.rows
        used = len(packed.rows)
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
            out[key] = x.reshape(self.rows, self.accumulation_steps, self.max_len).swapaxes(0, 1)
        return out


def describe(packer: StepPacker, *, padded_fraction: float) -> str:
    """One line for the run's output: rows per step and the real-token fractions."""
    return (
        f"packing: {packer.accumulation_steps} x {packer.rows} rows of {packer.max_len} tokens "
        f"per step; real tokens {packer.real_fraction:.1%} of the computed slots "
        f"(padded: {padded_fraction:.1%})"
    )
