"""Energy: RAPL counters (on a fake powercap tree), the FLOPs estimate, carbon, and the fallbacks."""

from __future__ import annotations

import pytest

from greencore.energy import EnergyMeter, RaplCounter, estimate_j, grams_co2e, open_counter
from greencore.spec import EnergySettings


def zone(root, name: str, energy_uj: int, max_uj: int = 1_000_000) -> None:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")


def test_rapl_sums_packages_ignores_subzones_and_handles_wraparound(tmp_path):
    zone(tmp_path, "intel-rapl:0", 900_000)
    zone(tmp_path, "intel-rapl:1", 100)
    zone(tmp_path, "intel-rapl:0:0", 5)  # the cores of package 0: part of it, not added again
    counter = RaplCounter(tmp_path)
    assert counter.read_j() == 0.0
    zone(tmp_path, "intel-rapl:0", 200_000)  # wrapped: 900000 -> 1000000 -> 0 -> 200000 is 300001 uJ
    zone(tmp_path, "intel-rapl:1", 1_100)
    zone(tmp_path, "intel-rapl:0:0", 999_999)
    assert counter.read_j() == pytest.approx((300_001 + 1_000) / 1e6)


def test_meter_reads_rapl_when_readable(tmp_path):
    zone(tmp_path, "intel-rapl:0", 1_000)
    meter = EnergyMeter("cpu", EnergySettings(), powercap_root=tmp_path)
    meter.start()
    zone(tmp_path, "intel-rapl:0", 501_000)
    reading = meter.stop(flops=1e15)
    assert (reading.energy_j, reading.method) == (pytest.approx(0.5), "rapl")


def test_meter_falls_back_to_the_estimate(tmp_path):
    settings = EnergySettings(peak_flops=2e12, utilization=0.5, watts=100.0, device_name="test-cpu")
    meter = EnergyMeter("cpu", settings, powercap_root=tmp_path / "absent")
    assert meter.counter is None
    meter.start()
    reading = meter.stop(flops=3e12)
    # 3e12 FLOPs at 1e12 FLOP/s is 3 s, at 100 W: 300 J.
    assert (reading.energy_j, reading.method) == (pytest.approx(300.0), "estimate")
    assert reading.inputs == {
        "flops": 3e12,
        "device_name": "test-cpu",
        "peak_flops": 2e12,
        "utilization": 0.5,
        "watts": 100.0,
    }
    assert estimate_j(3e12, settings).energy_j == reading.energy_j


def test_unreadable_rapl_falls_back(tmp_path):
    zone(tmp_path, "intel-rapl:0", 1_000)
    (tmp_path / "intel-rapl:0" / "energy_uj").unlink()  # as when the file is root-only: nothing to read
    assert open_counter("cpu", tmp_path) is None


def test_no_gpu_energy_counter_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the NVML path is exercised by bench/gpu_methods.sh")
    assert open_counter("cuda") is None


def test_carbon_is_kwh_times_intensity_times_pue():
    settings = EnergySettings(carbon_intensity_g_per_kwh=400.0, pue=1.5)
    assert grams_co2e(3.6e6, settings) == pytest.approx(600.0)
    assert grams_co2e(3.6e6, EnergySettings()) == pytest.approx(475.0)
