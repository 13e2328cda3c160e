"""Time and energy of a run calibrated from finished epochs, falling back to the declared device profile.

A :class:`Throughput` is what one finished epoch measured: its FLOPs (``flops.total``: training steps and
importance passes), optimizer steps, training seconds (``wall_s - valid_wall_s``: selection and steps, not
validation) and energy. :func:`calibrate` takes the records that match a run, the most specific first:

1. same device profile, model and method;
2. same device profile and model;
3. same device profile;

else the declared device profile (``EnergySettings``). The time model fitted on the records is

    train_s = s_per_flop x flops + s_per_step x steps

by least squares with both coefficients >= 0: the FLOPs term is the compute, the step term what FLOPs do not
count (kernel launches, the optimizer step, moving batches, Python), which dominates small models. When the
records cannot tell the two apart (their FLOPs per step within ``ALIKE_SPREAD`` of each other, e.g. the
epochs of one job) or a coefficient would be negative, the one-term fit (FLOPs alone, or steps alone) with the
smaller squared error is used.

Records that cannot tell the two terms apart speak only for runs like them: such a level times a run only if
the run's FLOPs per step is within theirs (``SPAN_SLACK``); otherwise the next broader level that can is used
(the same method at another budget: green at rho 0.7 does not time green at rho 0.5, whose steps are cheaper,
but the model's other methods together can), and where none can, the most specific. So each figure of an
estimate (full fine-tuning's, the method's) may rest on its own level: :meth:`Calibration.basis_for` says
which.

Energy: where records measured it (``rapl``, ``nvml``), the records' mean power (their joules over their wall
seconds) times the calibrated time; otherwise the declared profile's formula, ``flops / (peak x utilization)
x watts``, which is what a run records when no counter is readable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from greencore.spec import EnergySettings, EpochReport

MEASURED_ENERGY = ("rapl", "nvml")  # energy methods that read a hardware counter
MATCHES = ("device+model+method", "device+model", "device")  # most specific first


@dataclass(frozen=True)
class Throughput:
    """What one finished epoch measured, on device profile ``device``, training ``model`` with ``method``."""

    device: str  # the device profile's name (EnergySettings.device_name)
    model: str  # the model id the run trained
    method: str  # the fine-tuning method
    flops: int  # flops.total: training steps and importance passes
    steps: int  # optimizer steps
    train_s: float  # wall_s minus valid_wall_s: selection and training steps, seconds
    wall_s: float  # the epoch's seconds, validation included
    tokens: int
    energy_j: float
    energy_method: str  # "nvml", "rapl" or "estimate"

    @classmethod
    def of_epoch(cls, report: EpochReport, device: str, model: str, method: str) -> Throughput:
        """The record of a greencore epoch report."""
        return cls(
            device=device,
            model=model,
            method=method,
            flops=int(report.flops.get("total", 0)),
            steps=report.steps,
            train_s=max(0.0, report.wall_s - report.valid_wall_s),
            wall_s=report.wall_s,
            tokens=report.tokens,
            energy_j=report.energy_j,
            energy_method=report.energy_method,
        )

    def matches(self, match: str, device: str, model: str, method: str) -> bool:
        if self.device != device:
            return False
        if match == "device":
            return True
        return self.model == model and (match == "device+model" or self.method == method)


@dataclass(frozen=True)
class CalibrationBasis:
    """What a time or energy figure rests on: measured epochs (and which ones match), or the declared
    profile."""

    basis: str  # "measured" or "declared"
    match: str | None  # "device+model+method", "device+model" or "device"; None when declared
    epochs: int  # records the figure was fitted on (0 when declared)
    device: str  # the device profile's name
    model: str | None  # the model matched (None: any, or declared)
    method: str | None  # the method matched (None: any, or declared)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Records whose FLOPs per step spread by less than this cannot tell seconds per FLOP from seconds per step:
# an epoch's FLOPs per step moves by a few percent with its batches' padding, and its time by as much with
# the machine's load, so a spread that small fits noise.
ALIKE_SPREAD = 0.25
SPAN_SLACK = 0.05  # such records time a run within 5% of their FLOPs per step


@dataclass(frozen=True)
class TimeFit:
    """``train_s = s_per_flop x flops + s_per_step x steps``, fitted on the records ``basis`` describes;
    ``span``: the FLOPs per step those records cover when they cannot tell the two terms apart (None: they
    can, having different FLOPs per step)."""

    s_per_flop: float
    s_per_step: float
    basis: CalibrationBasis
    span: tuple[float, float] | None = None

    def speaks_for(self, flops: float, steps: int) -> bool:
        """Whether these records can time a run of ``flops`` in ``steps`` steps."""
        if self.span is None or steps <= 0:
            return True
        low, high = self.span
        return low * (1 - SPAN_SLACK) <= flops / steps <= high * (1 + SPAN_SLACK)


@dataclass(frozen=True)
class Calibration:
    """Seconds and joules of a run from its FLOPs and optimizer steps: ``fits`` per matching level, the most
    specific first (at least one: the declared profile's when no record matches)."""

    fits: tuple[TimeFit, ...]
    watts: float | None  # measured mean power; None: energy on the declared profile
    declared: EnergySettings
    energy_basis: CalibrationBasis

    def fit_for(self, flops: float, steps: int) -> TimeFit:
        """The most specific fit whose records can time this run (module docstring), else the most
        specific."""
        return next((f for f in self.fits if f.speaks_for(flops, steps)), self.fits[0])

    def basis_for(self, flops: float, steps: int) -> CalibrationBasis:
        """What the time of a run of ``flops`` in ``steps`` steps rests on."""
        return self.fit_for(flops, steps).basis

    @property
    def time_basis(self) -> CalibrationBasis:
        """The most specific level's basis (a run within its records' FLOPs per step rests on it)."""
        return self.fits[0].basis

    def time_s(self, flops: float, steps: int) -> float:
        """Training seconds (importance passes included, validation not) of ``flops`` in ``steps`` steps."""
        fit = self.fit_for(flops, steps)
        return fit.s_per_flop * flops + fit.s_per_step * steps

    def energy_j(self, flops: float, steps: int) -> float:
        """Joules of the same."""
        if self.watts is not None:
            return self.watts * self.time_s(flops, steps)
        return flops / (self.declared.peak_flops * self.declared.utilization) * self.declared.watts


def declared_basis(device: str) -> CalibrationBasis:
    return CalibrationBasis("declared", None, 0, device, None, None)


def declared(settings: EnergySettings) -> Calibration:
    """The declared device profile alone: ``flops / (peak x utilization)`` seconds, no per-step term."""
    basis = declared_basis(settings.device_name)
    fit = TimeFit(1 / (settings.peak_flops * settings.utilization), 0.0, basis)
    return Calibration((fit,), None, settings, basis)


def calibrate(records: Iterable[Throughput], model: str, method: str, profile: EnergySettings) -> Calibration:
    """The calibration of a run of ``method`` on ``model`` on the device profile ``profile``, from the
    matching levels of ``records`` (records of other devices, or with no FLOPs or no time, are left out);
    the declared profile where none matches."""
    device = profile.device_name
    usable = [r for r in records if r.flops > 0 and r.steps > 0 and r.train_s > 0]
    fallback = declared(profile)
    fits = []
    for match in MATCHES:
        chosen = [r for r in usable if r.matches(match, device, model, method)]
        if chosen:
            s_per_flop, s_per_step = fit_time(chosen)
            basis = _basis(match, len(chosen), device, model, method)
            fits.append(TimeFit(s_per_flop, s_per_step, basis, _alike_span(chosen)))
    energy_basis = fallback.energy_basis
    watts = None
    for match in MATCHES:
        chosen = [
            r
            for r in usable
            if r.energy_method in MEASURED_ENERGY and r.wall_s > 0 and r.matches(match, device, model, method)
        ]
        if chosen:
            watts = sum(r.energy_j for r in chosen) / sum(r.wall_s for r in chosen)
            energy_basis = _basis(match, len(chosen), device, model, method)
            break
    return Calibration(tuple(fits) or fallback.fits, watts, profile, energy_basis)


def _basis(match: str, epochs: int, device: str, model: str, method: str) -> CalibrationBasis:
    return CalibrationBasis(
        "measured",
        match,
        epochs,
        device,
        model if match != "device" else None,
        method if match == "device+model+method" else None,
    )


def fit_time(records: Sequence[Throughput]) -> tuple[float, float]:
    """(seconds per FLOP, seconds per step) fitting ``train_s = a x flops + b x steps`` on ``records`` by
    least squares with a, b >= 0 (see the module's docstring)."""
    x = [(float(r.flops), float(r.steps)) for r in records]
    y = [r.train_s for r in records]
    ff = sum(f * f for f, _ in x)
    ss = sum(s * s for _, s in x)
    fs = sum(f * s for f, s in x)
    fy = sum(f * t for (f, _), t in zip(x, y, strict=True))
    sy = sum(s * t for (_, s), t in zip(x, y, strict=True))
    if _alike_span(records) is None:
        det = ff * ss - fs * fs
        a, b = (fy * ss - sy * fs) / det, (sy * ff - fy * fs) / det
        if a >= 0 and b >= 0:
            return a, b

    def sse(a: float, b: float) -> float:
        return sum((a * f + b * s - t) ** 2 for (f, s), t in zip(x, y, strict=True))

    by_flops, by_steps = (fy / ff, 0.0), (0.0, sy / ss)
    return by_flops if sse(*by_flops) <= sse(*by_steps) else by_steps


def _alike_span(records: Sequence[Throughput]) -> tuple[float, float] | None:
    """The FLOPs per step the records cover when they are too alike to tell seconds per FLOP from seconds per
    step: within ALIKE_SPREAD of each other (the epochs of one job, or of jobs of one method at one budget);
    None when they spread wider."""
    per_step = [r.flops / r.steps for r in records]
    low, high = min(per_step), max(per_step)
    return (low, high) if high <= low * (1 + ALIKE_SPREAD) else None
