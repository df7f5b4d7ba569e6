"""Energy used by a run: GPU board power via NVML, else CPU package energy via RAPL.

Sources, tried in order by :class:`EnergyMeter`:

- ``"nvml"``: ``pynvml`` importable and at least one GPU. Board power of every GPU
  (``nvmlDeviceGetPowerUsage``, mW) is sampled by a background thread and integrated with the
  trapezoid rule: E = sum_i (P_i + P_{i+1}) / 2 * (t_{i+1} - t_i). This is what the paper logged
  ("GPU power"); it excludes CPU and host memory.
- ``"rapl"``: Linux powercap counters ``/sys/class/powercap/intel-rapl:N/energy_uj`` of every CPU
  package N (sub-domains ``intel-rapl:N:M`` such as core/dram are parts of the package and are
  not added again). The counters are cumulative microjoules that wrap at
  ``max_energy_range_uj``; a wrap is detected as a decrease and the range added back, which is
  exact provided at most one wrap happens between two readings -- the sampling thread reads
  every ``interval_s`` seconds, far below a wrap period (minutes at hundreds of watts).
  The counters cover the whole package, i.e. other processes running on the machine as well.
  They are often root-only (since Linux 5.10); unreadable counters mean "unavailable".
- ``"unavailable"``: energy and mean power are None.
"""

from __future__ import annotations

import glob
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple

__all__ = ["EnergyMeter", "EnergyReading", "JOULES_PER_KWH"]

JOULES_PER_KWH = 3.6e6


class EnergyReading(NamedTuple):
    """Energy since :meth:`EnergyMeter.start`; unpacks as ``(kwh, source, mean_watts)``."""

    kwh: float | None
    source: str
    mean_watts: float | None


# -- NVML ----------------------------------------------------------------------------------------


class _NvmlPower:
    """Summed board power (W) of all GPUs; raises at construction when NVML/GPUs are absent."""

    def __init__(self):
        import pynvml  # optional dependency

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        if count < 1:
            pynvml.nvmlShutdown()
            raise RuntimeError("NVML reports no GPU")
        self._nvml = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        self.detail = f"{count} GPU(s), NVML board power sampled and integrated"

    def watts(self) -> float:
        return sum(self._nvml.nvmlDeviceGetPowerUsage(h) for h in self._handles) / 1e3

    def close(self) -> None:
        self._nvml.nvmlShutdown()


# -- RAPL ----------------------------------------------------------------------------------------

_PACKAGE = re.compile(r"intel-rapl:\d+$")


class _RaplCounters:
    """Cumulative package energy (J) from wrapping powercap counters."""

    def __init__(self, root: str | os.PathLike):
        domains = sorted(
            p
            for p in glob.glob(os.path.join(root, "intel-rapl:*"))
            if _PACKAGE.search(os.path.basename(p))
        )
        if not domains:
            raise RuntimeError(f"no RAPL package domains under {root}")
        self._files = [Path(d) / "energy_uj" for d in domains]
        self._ranges = [int((Path(d) / "max_energy_range_uj").read_text()) for d in domains]
        self._last = self._read_all()  # raises PermissionError when root-only
        self._total_uj = 0
        self.detail = f"{len(domains)} CPU package(s), RAPL energy counters"

    def _read_all(self) -> list[int]:
        return [int(f.read_text()) for f in self._files]

    def joules(self) -> float:
        """Energy since construction; call often enough that no counter wraps twice."""
        now = self._read_all()
        for last, cur, span in zip(self._last, now, self._ranges):
            self._total_uj += cur - last if cur >= last else span - last + cur
        self._last = now
        return self._total_uj / 1e6


# -- the meter -----------------------------------------------------------------------------------


class EnergyMeter:
    """Measure the energy of a run from :meth:`start` on.

    >>> meter = EnergyMeter(); meter.start()  # doctest: +SKIP
    >>> kwh, source, mean_watts = meter.read()  # doctest: +SKIP

    Args:
      rapl_root: powercap directory (tests point it at a fake tree).
      use_nvml: try NVML first (set False to force RAPL / unavailable).
      interval_s: sampling period of the background thread (NVML power samples; RAPL readings
        that keep wrap-around detection safe); None = no thread, sample only in :meth:`read`.
      clock: monotonic time source in seconds (tests inject a fake one).
    """

    def __init__(
        self,
        *,
        rapl_root: str | os.PathLike = "/sys/class/powercap",
        use_nvml: bool = True,
        interval_s: float | None = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if interval_s is not None and interval_s <= 0:
            raise ValueError(f"interval_s={interval_s}: must be > 0 or None")
        self._rapl_root = rapl_root
        self._use_nvml = use_nvml
        self._interval = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backend = None
        self.source = "unavailable"
        self.detail = "not started"
        self._t0 = self._t_last = 0.0
        self._joules = 0.0
        self._p_last = 0.0
        self._live = False  # backend open and sampling

    def _open_backend(self) -> None:
        reasons = []
        if self._use_nvml:
            try:
                self._backend, self.source = _NvmlPower(), "nvml"
                self.detail = self._backend.detail
                return
            except Exception as e:  # ImportError, NVMLError, no GPU
                reasons.append(f"NVML: {type(e).__name__}: {e}")
        try:
            self._backend, self.source = _RaplCounters(self._rapl_root), "rapl"
            self.detail = self._backend.detail
            return
        except (OSError, RuntimeError, ValueError) as e:
            reasons.append(f"RAPL: {type(e).__name__}: {e}")
        self._backend, self.source = None, "unavailable"
        self.detail = "; ".join(reasons)

    def start(self) -> "EnergyMeter":
        """Choose the source and start measuring (energy counted from now)."""
        self.stop()
        self._open_backend()
        self._joules = 0.0
        self._t0 = self._t_last = self._clock()
        self._live = self._backend is not None
        if self.source == "nvml":
            self._p_last = self._backend.watts()
        if self._backend is not None and self._interval is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="energy-meter", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._sample()
            except Exception:  # a sensor hiccup must not kill training; read() will retry
                pass

    def _sample(self) -> None:
        with self._lock:
            if not self._live:
                return
            t = self._clock()
            if self.source == "nvml":
                p = self._backend.watts()
                self._joules += 0.5 * (p + self._p_last) * (t - self._t_last)
                self._p_last = p
            elif self.source == "rapl":
                self._joules = self._backend.joules()
            self._t_last = t

    def read(self) -> EnergyReading:
        """``(kwh, source, mean_watts)`` since :meth:`start`; kwh/watts None if unavailable."""
        if self.detail == "not started":
            raise RuntimeError("EnergyMeter.read() before start()")
        if self.source == "unavailable":
            return EnergyReading(None, "unavailable", None)
        self._sample()
        elapsed = self._t_last - self._t0
        mean = self._joules / elapsed if elapsed > 0 else None
        return EnergyReading(self._joules / JOULES_PER_KWH, self.source, mean)

    def stop(self) -> None:
        """Stop the background thread (read() still samples on demand)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Take a last sample, stop and release NVML; :meth:`read` then returns the final totals."""
        self.stop()
        if self._live:
            self._sample()
            with self._lock:
                self._live = False
            if self.source == "nvml":
                self._backend.close()

    def __enter__(self) -> "EnergyMeter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
