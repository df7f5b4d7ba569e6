"""The benchmark protocol every script in ``benchmarks/`` follows.

The two cores of this project's machines are shared, and PyTorch's threads slow down far more
than XLA's under contention, so a ratio taken under load can be off by 4x. Every timed figure is
therefore taken like this:

- the load average is printed before and after, and a run whose load average exceeded 0.5 says
  so in its output (:class:`LoadWatch`);
- the sides are interleaved (A B, B A, A B, ...), one step of each per round, so a slow phase of
  the machine hits every side (:func:`interleaved`);
- the minimum and the median of at least 7 timed steps per side are reported;
- the contamination of every round is measured: the busy CPU time of the whole machine
  (``/proc/stat``) minus this process's own (``os.times()``, children included), as a fraction
  of the round's wall time x the cores. A round above 5% of the cores is thrown away and run
  again (up to ``max_retries`` times per round); the summary says how many rounds were retried
  and the worst contamination among the rounds kept.

Only figures a script printed with ``clean: yes`` go into a README.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Mapping

MIN_STEPS = 7
LOAD_LIMIT = 0.5
CONTAMINATION_LIMIT = 0.05


def _machine_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (``/proc/stat``; 0 where unavailable)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclasses.dataclass
class Contamination:
    """Measures the CPU time others spent on the machine while a block of code ran."""

    cores: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)

    def __enter__(self) -> Contamination:
        self._busy, self._own, self._wall = (
            _machine_busy_seconds(),
            _own_cpu_seconds(),
            time.perf_counter(),
        )
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._wall
        others = (_machine_busy_seconds() - self._busy) - (_own_cpu_seconds() - self._own)
        # /proc/stat ticks at 100 Hz: a round shorter than a few ticks reads as noise, never < 0.
        self.fraction = max(0.0, others) / max(wall * self.cores, 1e-9)


class LoadWatch:
    """Prints the load average at start and end; ``clean`` is False if others loaded the machine.

    The load average after a run always includes the run's own threads (a two-thread step keeps
    it near 2), so it cannot tell whether *others* were running. The verdict therefore uses the
    load average before the run (others' work still queued when we start) together with the
    per-round contamination measured by :class:`Contamination`, which excludes our own CPU time.
    The load after is still printed, and a warning says when either reading exceeded 0.5.
    """

    def __init__(self, label: str = "benchmark") -> None:
        self.label = label
        self.before = os.getloadavg()
        print(f"[{label}] load average before: {_fmt_load(self.before)}", flush=True)

    def finish(self) -> bool:
        self.after = os.getloadavg()
        print(f"[{self.label}] load average after: {_fmt_load(self.after)}", flush=True)
        if self.before[0] > LOAD_LIMIT:
            print(
                f"[{self.label}] WARNING: the 1-minute load average was {self.before[0]:.2f} > "
                f"{LOAD_LIMIT} before the run: the machine was not idle, these figures are not "
                "for a README",
                flush=True,
            )
        elif self.after[0] > LOAD_LIMIT:
            print(
                f"[{self.label}] note: the 1-minute load average reached {self.after[0]:.2f} > "
                f"{LOAD_LIMIT} by the end; it counts this run's own threads, and the per-round "
                "contamination (others' CPU time only) decides whether the figures are clean",
                flush=True,
            )
        return self.before[0] <= LOAD_LIMIT


def _fmt_load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


@dataclasses.dataclass
class Timing:
    """Seconds per step of one side."""

    samples: list[float]

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


@dataclasses.dataclass
class InterleavedResult:
    timings: dict[str, Timing]
    retried_rounds: int
    worst_contamination: float  # among the rounds kept
    clean: bool  # every kept round below the contamination limit

    def summary_lines(self) -> list[str]:
        lines = [
            f"{'side':<28} {'min s':>9} {'median s':>9}  (n = {len(next(iter(self.timings.values())).samples)})"
        ]
        for name, t in self.timings.items():
            lines.append(f"{name:<28} {t.min:9.4f} {t.median:9.4f}")
        lines.append(
            f"contamination (others' CPU / cores, worst kept round): "
            f"{100 * self.worst_contamination:.1f}% (limit {100 * CONTAMINATION_LIMIT:.0f}%); "
            f"rounds retried: {self.retried_rounds}; clean: {'yes' if self.clean else 'NO'}"
        )
        return lines


def interleaved(
    sides: Mapping[str, Callable[[], object]],
    *,
    steps: int = MIN_STEPS,
    warmup: int = 2,
    max_retries: int = 3,
) -> InterleavedResult:
    """Times ``steps`` calls of every side, one call of each per round, alternating the order.

    Each callable must block until its step is finished (``jax.block_until_ready``). Rounds whose
    contamination exceeds 5% of the cores are repeated, up to ``max_retries`` times each.
    """
    if steps < MIN_STEPS:
        raise ValueError(f"steps must be >= {MIN_STEPS} (the protocol's minimum), got {steps}")
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    retried, worst, clean = 0, 0.0, True
    for round_index in range(steps):
        order = names if round_index % 2 == 0 else names[::-1]
        for attempt in range(max_retries + 1):
            times = {}
            with Contamination() as c:
                for name in order:
                    start = time.perf_counter()
                    sides[name]()
                    times[name] = time.perf_counter() - start
            if c.fraction <= CONTAMINATION_LIMIT or attempt == max_retries:
                break
            retried += 1
        clean &= c.fraction <= CONTAMINATION_LIMIT
        worst = max(worst, c.fraction)
        for name, t in times.items():
            samples[name].append(t)
    return InterleavedResult({n: Timing(s) for n, s in samples.items()}, retried, worst, clean)
