"""Energy of a training epoch, with no network: a hardware counter when one is readable, else an estimate.

In order of preference:

- ``nvml``: the GPU's own energy counter (``nvmlDeviceGetTotalEnergyConsumption``, millijoules since the
  driver loaded; Volta and later), read through nvidia-ml-py when training runs on CUDA.
- ``rapl``: the CPU packages' RAPL counters under ``/sys/class/powercap/intel-rapl:N/energy_uj`` (microjoules,
  wrapping at ``max_energy_range_uj``) when training runs on the CPU and they are readable. They count the
  whole package, other processes included.
- ``estimate``: ``flops / (peak_flops * utilization) * watts`` from the device profile declared in
  :class:`~greencore.spec.EnergySettings`; its inputs are recorded beside it.

Carbon is ``kWh x carbon_intensity_g_per_kwh x pue``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from greencore.spec import EnergySettings

J_PER_KWH = 3.6e6
POWERCAP = Path("/sys/class/powercap")


@dataclass
class EnergyReading:
    """Energy spent between start() and stop(): joules, how it was obtained, and what went into it."""

    energy_j: float
    method: str  # "nvml", "rapl" or "estimate"
    inputs: dict[str, Any] = field(default_factory=dict)


class EnergyCounter(Protocol):
    method: str

    def read_j(self) -> float:
        """Cumulative energy in joules (an arbitrary origin; only differences mean anything)."""
        ...


class NvmlCounter:
    method = "nvml"

    def __init__(self, device_index: int) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = self._handle_for(device_index)
        self.read_j()  # fails here, not mid-epoch, where the GPU has no energy counter

    def _handle_for(self, device_index: int) -> Any:
        # CUDA and NVML may number GPUs differently (CUDA_VISIBLE_DEVICES); match by UUID when torch knows it.
        import torch

        uuid = str(getattr(torch.cuda.get_device_properties(device_index), "uuid", "") or "")
        for i in range(self._nvml.nvmlDeviceGetCount()):
            handle = self._nvml.nvmlDeviceGetHandleByIndex(i)
            nvml_uuid = self._nvml.nvmlDeviceGetUUID(handle)
            nvml_uuid = nvml_uuid.decode() if isinstance(nvml_uuid, bytes) else str(nvml_uuid)
            if uuid and nvml_uuid.removeprefix("GPU-") == uuid.removeprefix("GPU-"):
                return handle
        return self._nvml.nvmlDeviceGetHandleByIndex(device_index)

    def read_j(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1e3


class RaplCounter:
    method = "rapl"

    def __init__(self, root: Path = POWERCAP) -> None:
        # Top-level package zones only (intel-rapl:0, intel-rapl:1): their sub-zones (cores, dram) are parts
        # of them, and adding both would count twice.
        self._zones = [z for z in sorted(root.glob("intel-rapl:*")) if z.name.count(":") == 1]
        if not self._zones:
            raise OSError(f"no RAPL package zone under {root}")
        self._max_uj = [int((z / "max_energy_range_uj").read_text()) for z in self._zones]
        self._last = [self._raw(z) for z in self._zones]  # raises PermissionError where unreadable
        self._total_uj = 0

    @staticmethod
    def _raw(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def read_j(self) -> float:
        for i, zone in enumerate(self._zones):
            now = self._raw(zone)
            delta = now - self._last[i]
            if delta < 0:  # the counter wrapped
                delta += self._max_uj[i] + 1
            self._total_uj += delta
            self._last[i] = now
        return self._total_uj / 1e6


def open_counter(device: str, powercap_root: Path = POWERCAP) -> EnergyCounter | None:
    """The best energy counter readable for training on ``device`` ("cuda", "cuda:N", "cpu"), else None."""
    if device.startswith("cuda"):
        try:
            index = int(device.split(":")[1]) if ":" in device else 0
            return NvmlCounter(index)
        except Exception:  # no NVML library, no permission, or a GPU without an energy counter
            return None
    try:
        return RaplCounter(powercap_root)
    except (OSError, ValueError):
        return None


def estimate_j(flops: float, settings: EnergySettings) -> EnergyReading:
    """Energy of ``flops`` on the declared device: the time it takes at ``utilization`` of peak, times
    watts."""
    seconds = flops / (settings.peak_flops * settings.utilization)
    inputs = {
        "flops": flops,
        "device_name": settings.device_name,
        "peak_flops": settings.peak_flops,
        "utilization": settings.utilization,
        "watts": settings.watts,
    }
    return EnergyReading(seconds * settings.watts, "estimate", inputs)


class EnergyMeter:
    """Measures one interval: ``start()``, then ``stop(flops)`` gives the :class:`EnergyReading` of it."""

    def __init__(self, device: str, settings: EnergySettings, powercap_root: Path = POWERCAP) -> None:
        self.settings = settings
        self.counter = open_counter(device, powercap_root)
        self._start: float | None = None

    def start(self) -> None:
        self._start = self.counter.read_j() if self.counter is not None else None

    def stop(self, flops: float) -> EnergyReading:
        """The interval's energy; ``flops`` is used only by the estimate, when no counter is readable."""
        if self.counter is not None and self._start is not None:
            try:
                return EnergyReading(self.counter.read_j() - self._start, self.counter.method, {})
            except OSError:
                self.counter = None
        return estimate_j(flops, self.settings)


def grams_co2e(energy_j: float, settings: EnergySettings) -> float:
    """gCO2e of ``energy_j`` joules drawn by the device: kWh x grid intensity x PUE."""
    return energy_j / J_PER_KWH * settings.carbon_intensity_g_per_kwh * settings.pue
