"""train.energy: RAPL counters (fake powercap tree, wrap-around), NVML (fake module), unavailable."""

import sys
import time
import types

import pytest

from hacbo_jax.trainer.energy import JOULES_PER_KWH, EnergyMeter

RANGE = 262_143_328_850  # a real max_energy_range_uj


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _domain(root, name, energy_uj, span=RANGE):
    d = root / name
    d.mkdir()
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{span}\n")
    return d


def _set(domain, energy_uj):
    (domain / "energy_uj").write_text(f"{energy_uj}\n")


@pytest.fixture
def rapl(tmp_path):
    root = tmp_path / "powercap"
    root.mkdir()
    pkg0 = _domain(root, "intel-rapl:0", RANGE - 1_000_000)  # 1 J before wrapping
    pkg1 = _domain(root, "intel-rapl:1", 5_000_000)
    core = _domain(pkg0, "intel-rapl:0:0", 0)  # a sub-domain of package 0
    _domain(root, "intel-rapl:0:1", 0)  # a flat-layout sub-domain
    return root, pkg0, pkg1, core


def test_rapl_sums_packages_and_handles_wrap_around(rapl):
    root, pkg0, pkg1, core = rapl
    clock = FakeClock()
    meter = EnergyMeter(rapl_root=root, use_nvml=False, interval_s=None, clock=clock).start()
    assert meter.source == "rapl" and "2 CPU package" in meter.detail
    _set(pkg0, 500_000)  # wrapped: 1 J to the top + 0.5 J
    _set(pkg1, 15_000_000)  # +10 J
    _set(core, 7_000_000)  # sub-domain: part of package 0, not added
    clock.t += 2.0
    kwh, source, watts = meter.read()
    assert source == "rapl"
    assert kwh == pytest.approx(11.5 / JOULES_PER_KWH, rel=1e-12)
    assert watts == pytest.approx(11.5 / 2.0)
    # a second wrap of package 0, seen because we read in between: totals keep accumulating
    _set(pkg0, RANGE - 100)  # +(RANGE - 100 - 500_000) uJ
    clock.t += 1.0
    meter.read()
    _set(pkg0, 900)  # wrapped again: +1000 uJ
    clock.t += 1.0
    kwh, _, watts = meter.read()
    joules = 11.5 + (RANGE - 100 - 500_000) / 1e6 + 1000 / 1e6
    assert kwh * JOULES_PER_KWH == pytest.approx(joules, rel=1e-12)
    assert watts == pytest.approx(joules / 4.0)
    meter.close()
    assert meter.read().kwh * JOULES_PER_KWH == pytest.approx(joules, rel=1e-12)


def test_rapl_background_thread_keeps_wraps_apart(rapl):
    """Two wraps between two read() calls are both counted when the thread read in between."""
    root, pkg0, pkg1, _ = rapl
    meter = EnergyMeter(rapl_root=root, use_nvml=False, interval_s=0.005).start()

    def wait_for_sample():
        before = meter._t_last
        deadline = time.monotonic() + 10
        while meter._t_last == before and time.monotonic() < deadline:
            time.sleep(0.005)
        assert meter._t_last != before, "sampling thread never ran"

    _set(pkg0, 100)  # wrap 1: +1 J + 100 uJ
    wait_for_sample()
    _set(pkg0, RANGE - 1_000_000)  # +(RANGE - 1_000_100) uJ, no wrap
    wait_for_sample()
    _set(pkg0, 100)  # wrap 2: +1 J + 100 uJ
    kwh, _, _ = meter.read()
    meter.close()
    assert kwh * JOULES_PER_KWH == pytest.approx(
        (1_000_100 * 2 + RANGE - 1_000_100) / 1e6, rel=1e-12
    )


@pytest.mark.parametrize("breakage", ["empty", "no_energy_file", "not_a_number"])
def test_unavailable(tmp_path, breakage):
    root = tmp_path / "powercap"
    root.mkdir()
    if breakage == "no_energy_file":
        (_domain(root, "intel-rapl:0", 1) / "energy_uj").unlink()
    elif breakage == "not_a_number":
        (_domain(root, "intel-rapl:0", 1) / "energy_uj").write_text("n/a\n")
    meter = EnergyMeter(rapl_root=root, use_nvml=False, interval_s=None).start()
    assert tuple(meter.read()) == (None, "unavailable", None)
    assert "RAPL" in meter.detail
    meter.close()


def test_read_before_start_is_an_error():
    with pytest.raises(RuntimeError, match="before start"):
        EnergyMeter().read()
    with pytest.raises(ValueError, match="interval_s=0"):
        EnergyMeter(interval_s=0)


def _fake_pynvml(powers_mw, n_gpus=2):
    """A pynvml stand-in whose GPUs each draw the next value of ``powers_mw`` per reading."""
    it = iter(powers_mw)
    state = {"current": None, "reads": 0, "shutdown": False}

    def power(handle):
        if state["reads"] % n_gpus == 0:
            state["current"] = next(it)
        state["reads"] += 1
        return state["current"]

    mod = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: n_gpus,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetPowerUsage=power,
        nvmlShutdown=lambda: state.update(shutdown=True),
    )
    return mod, state


def test_nvml_integrates_power_with_trapezoids(monkeypatch, rapl):
    # each GPU at 50 W, then 100 W, then 100 W: summed 100 W -> 200 W -> 200 W
    mod, state = _fake_pynvml([50_000, 100_000, 100_000, 100_000])
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    clock = FakeClock()
    meter = EnergyMeter(rapl_root=rapl[0], interval_s=None, clock=clock).start()
    assert meter.source == "nvml" and "2 GPU" in meter.detail
    clock.t += 1.0
    kwh, source, watts = meter.read()  # (100 + 200) / 2 * 1 s = 150 J
    assert source == "nvml" and kwh * JOULES_PER_KWH == pytest.approx(150.0)
    assert watts == pytest.approx(150.0)
    clock.t += 2.0
    kwh, _, watts = meter.read()  # + 200 W * 2 s = 550 J over 3 s
    assert kwh * JOULES_PER_KWH == pytest.approx(550.0)
    assert watts == pytest.approx(550.0 / 3)
    meter.close()  # a last sample at the same time adds nothing
    assert state["shutdown"] and meter.read().kwh * JOULES_PER_KWH == pytest.approx(550.0)


def test_nvml_without_gpu_falls_back_to_rapl(monkeypatch, rapl):
    mod, _ = _fake_pynvml([], n_gpus=0)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    meter = EnergyMeter(rapl_root=rapl[0], interval_s=None).start()
    assert meter.source == "rapl" and meter.read().source == "rapl"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    meter = EnergyMeter(rapl_root=rapl[0], interval_s=None).start()
    assert meter.source == "rapl"
