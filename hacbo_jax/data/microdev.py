"""The micro-dev buffer (docs/algorithm.md: "Micro-dev buffer").

A buffer of ``buffer_size`` (N_dev) distinct items drawn from a pool of ``pool_size`` items,
identified by their pool index (the caller maps indices to examples). Every
``refresh_interval`` (R) steps, :meth:`MicroDevBuffer.refresh`:

1. marks each buffer item solved / unsolved with ``solve_fn`` (the training loop implements it
   as batched greedy decoding + exact match);
2. picks D = floor(r * #solved) solved items at random (r = ``replace_fraction``);
3. scores pool items NOT in the buffer, in a random order and at most ``max_candidates`` of them
   (so a refresh stays cheap), stopping once D of them are wrong;
4. replaces the first min(D, #wrong) picked items by the wrong candidates, in place; when fewer
   than D candidates are wrong the remaining picked items stay in the buffer.

Micro-dev batches (:meth:`sample`) are random subsets of the buffer.

All randomness is counter-based: refresh k uses ``default_rng([seed, 1, k])`` and batch k
``default_rng([seed, 2, k])``, so the complete state is the member list plus a few integer
counters (:meth:`state_dict`, plain ints and an int64 array, JSON- and orbax-friendly), and a
restored buffer continues exactly as the original would have.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

SolveFn = Callable[[np.ndarray], np.ndarray]
"""Maps int64 pool indices [n] to a bool array [n]: True where the model solves the item."""

_INIT, _REFRESH, _BATCH = 0, 1, 2


class RefreshStats(NamedTuple):
    """What one refresh did (for logs)."""

    step: int
    num_solved: int  # buffer items the model solved
    num_to_drop: int  # floor(r * num_solved)
    num_scored: int  # pool candidates scored
    num_wrong: int  # candidates found wrong (<= num_to_drop, the search stops there)
    num_replaced: int  # = min(num_to_drop, num_wrong)


class MicroDevBuffer:
    """Seeded micro-dev buffer over pool indices ``0 .. pool_size - 1``.

    Args:
      pool_size: number of items in the pool (e.g. the held-out train slice).
      buffer_size: N_dev, the number of items in the buffer (paper: 1,024); <= pool_size.
      refresh_interval: R; :meth:`refresh` acts on steps that are positive multiples of R.
      replace_fraction: r in [0, 1].
      max_candidates: at most this many pool candidates are scored per refresh (None: all).
      score_chunk: candidates are scored in chunks of this size; scoring stops early once
        enough wrong ones are found.
      seed: seeds the initial fill, the refreshes and the batches.
    """

    def __init__(
        self,
        pool_size: int,
        buffer_size: int,
        *,
        refresh_interval: int = 500,
        replace_fraction: float = 0.25,
        max_candidates: int | None = 256,
        score_chunk: int = 64,
        seed: int = 0,
    ):
        if not 1 <= buffer_size <= pool_size:
            raise ValueError(f"need 1 <= buffer_size ({buffer_size}) <= pool_size ({pool_size})")
        if refresh_interval < 1:
            raise ValueError(f"refresh_interval={refresh_interval} must be >= 1")
        if not 0.0 <= replace_fraction <= 1.0:
            raise ValueError(f"replace_fraction={replace_fraction} must be in [0, 1]")
        if max_candidates is not None and max_candidates < 0:
            raise ValueError(f"max_candidates={max_candidates} must be >= 0 or None")
        if score_chunk < 1:
            raise ValueError(f"score_chunk={score_chunk} must be >= 1")
        self.pool_size = pool_size
        self.buffer_size = buffer_size
        self.refresh_interval = refresh_interval
        self.replace_fraction = replace_fraction
        self.max_candidates = max_candidates
        self.score_chunk = score_chunk
        self.seed = seed
        initial = np.random.default_rng([seed, _INIT]).choice(
            pool_size, size=buffer_size, replace=False
        )
        self._members = initial.astype(np.int64)
        self.num_refreshes = 0
        self.num_batches = 0
        self.num_replaced = 0

    @property
    def members(self) -> np.ndarray:
        """Pool indices in the buffer, int64 [buffer_size] (a copy)."""
        return self._members.copy()

    def due(self, step: int) -> bool:
        """Whether :meth:`refresh` acts at ``step`` (positive multiples of R)."""
        return step > 0 and step % self.refresh_interval == 0

    def refresh(self, step: int, solve_fn: SolveFn) -> RefreshStats | None:
        """Refreshes the buffer if :meth:`due` (``step``), else returns None without scoring."""
        return self.refresh_now(solve_fn, step=step) if self.due(step) else None

    def refresh_now(self, solve_fn: SolveFn, *, step: int = -1) -> RefreshStats:
        """Refreshes the buffer unconditionally (see the module docstring)."""
        rng = np.random.default_rng([self.seed, _REFRESH, self.num_refreshes])
        solved = _call(solve_fn, self._members)
        solved_positions = np.flatnonzero(solved)
        num_to_drop = int(np.floor(self.replace_fraction * solved_positions.size))
        num_scored, wrong = 0, np.empty(0, dtype=np.int64)
        if num_to_drop > 0:
            drop_positions = rng.choice(solved_positions, size=num_to_drop, replace=False)
            outside = np.setdiff1d(np.arange(self.pool_size, dtype=np.int64), self._members)
            candidates = rng.permutation(outside)
            if self.max_candidates is not None:
                candidates = candidates[: self.max_candidates]
            found = []
            for start in range(0, candidates.size, self.score_chunk):
                chunk = candidates[start : start + self.score_chunk]
                found.append(chunk[~_call(solve_fn, chunk)])
                num_scored += chunk.size
                if sum(map(len, found)) >= num_to_drop:
                    break
            wrong = np.concatenate(found)[:num_to_drop] if found else wrong
            self._members[drop_positions[: wrong.size]] = wrong
        self.num_refreshes += 1
        self.num_replaced += int(wrong.size)
        return RefreshStats(
            step,
            int(solved_positions.size),
            num_to_drop,
            num_scored,
            int(wrong.size),
            int(wrong.size),
        )

    def sample(self, batch_size: int) -> np.ndarray:
        """Pool indices of a micro-dev batch: ``batch_size`` distinct buffer members, seeded."""
        if not 1 <= batch_size <= self.buffer_size:
            raise ValueError(
                f"need 1 <= batch_size ({batch_size}) <= buffer_size ({self.buffer_size})"
            )
        rng = np.random.default_rng([self.seed, _BATCH, self.num_batches])
        self.num_batches += 1
        return self._members[rng.choice(self.buffer_size, size=batch_size, replace=False)]

    def state_dict(self) -> dict:
        """Full state: plain ints and an int64 member array (``.tolist()`` it for JSON)."""
        return {
            "members": self._members.copy(),
            "num_refreshes": self.num_refreshes,
            "num_batches": self.num_batches,
            "num_replaced": self.num_replaced,
            "seed": self.seed,
            "pool_size": self.pool_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` output (arrays may come back as lists)."""
        members = np.asarray(state["members"], dtype=np.int64)
        if int(state["pool_size"]) != self.pool_size or int(state["seed"]) != self.seed:
            raise ValueError(
                f"state is for pool_size={state['pool_size']}, seed={state['seed']}; this buffer has "
                f"pool_size={self.pool_size}, seed={self.seed}"
            )
        if members.shape != (self.buffer_size,) or np.unique(members).size != self.buffer_size:
            raise ValueError(
                f"state members must be {self.buffer_size} distinct indices, got shape {members.shape}"
            )
        if members.min() < 0 or members.max() >= self.pool_size:
            raise ValueError(f"state members must lie in [0, {self.pool_size})")
        self._members = members.copy()
        self.num_refreshes = int(state["num_refreshes"])
        self.num_batches = int(state["num_batches"])
        self.num_replaced = int(state["num_replaced"])


def _call(solve_fn: SolveFn, indices: np.ndarray) -> np.ndarray:
    result = np.asarray(solve_fn(indices.copy()))
    if result.shape != indices.shape:
        raise ValueError(
            f"solve_fn returned shape {result.shape} for {indices.shape[0]} items; expected {indices.shape}"
        )
    return result.astype(bool)
