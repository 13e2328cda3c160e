"""The calibration of estimates on measured epochs (greencore.throughput): the most specific match is chosen,
the fitted time reproduces a known throughput, energy follows measured power only where a counter measured
it, and the declared device profile stands where nothing matches."""

from __future__ import annotations

import pytest

from greencore.spec import EnergySettings, EpochReport
from greencore.throughput import Throughput, calibrate, declared, fit_time

PROFILE = EnergySettings(device_name="box", peak_flops=1e12, utilization=0.5, watts=100.0)


def record(
    model: str = "m",
    method: str = "green",
    device: str = "box",
    flops: int = 10**9,
    steps: int = 10,
    train_s: float = 1.0,
    energy_method: str = "estimate",
    energy_j: float = 0.2,
) -> Throughput:
    return Throughput(device, model, method, flops, steps, train_s, train_s, 100, energy_j, energy_method)


def test_declared_where_no_record_matches() -> None:
    records = [record(device="other", train_s=99.0)]  # another device profile never calibrates this one
    cal = calibrate(records, "m", "green", PROFILE)
    assert cal.time_basis.basis == cal.energy_basis.basis == "declared"
    assert cal.time_basis.epochs == 0
    assert cal.time_s(1e12, 5) == pytest.approx(2.0)  # 1e12 FLOPs at 0.5 x 1e12 FLOP/s; steps cost nothing
    assert cal.energy_j(1e12, 5) == pytest.approx(200.0)  # 2 s x 100 W
    assert declared(PROFILE) == cal


@pytest.mark.parametrize(
    ("model", "method", "match", "train_s", "epochs"),
    [
        ("m", "green", "device+model+method", 1.0, 1),
        ("m", "lora", "device+model", 5 / 3, 3),
        ("n", "lora", "device", 2.0, 4),
    ],
)
def test_most_specific_match(model: str, method: str, match: str, train_s: float, epochs: int) -> None:
    """Records of the same model and method win over the model's other methods, which win over other models;
    each level fitted on all the records it matches (for the same FLOPs and steps: their mean time)."""
    records = [
        record("m", "green", train_s=1.0),
        record("m", "full", train_s=2.0),
        record("m", "full", train_s=2.0),
        record("x", "full", train_s=3.0),
    ]
    cal = calibrate(records, model, method, PROFILE)
    assert cal.time_basis.basis == "measured"
    assert cal.time_basis.match == match
    assert cal.time_basis.epochs == epochs
    assert cal.time_basis.model == (None if match == "device" else model)
    assert cal.time_basis.method == (method if match == "device+model+method" else None)
    assert cal.time_s(10**9, 10) == pytest.approx(train_s)


def test_known_throughput_and_per_step_overhead() -> None:
    """Epochs made at 2e9 FLOP/s plus 0.05 s per step are fitted exactly, and a run of another size is timed
    as that throughput says (a one-term fit on FLOPs would be 18% off for it)."""
    a, b = 1 / 2e9, 0.05
    shapes = [(4 * 10**9, 10), (10**9, 40), (8 * 10**9, 8)]
    records = [record(flops=f, steps=s, train_s=a * f + b * s) for f, s in shapes]
    assert fit_time(records) == (pytest.approx(a), pytest.approx(b))
    cal = calibrate(records, "m", "green", PROFILE)
    assert cal.time_s(2 * 10**10, 100) == pytest.approx(15.0)


def test_one_job_epochs_fit_on_flops() -> None:
    """Epochs of one job (the same FLOPs per step) cannot tell steps from FLOPs: the ratio stands, and it
    gives back the job's own time."""
    records = [record(flops=3 * 10**9, steps=12, train_s=t) for t in (1.2, 1.4, 1.3)]
    s_per_flop, s_per_step = fit_time(records)
    assert s_per_step == 0.0
    assert calibrate(records, "m", "green", PROFILE).time_s(9 * 10**9, 36) == pytest.approx(3.9)
    assert s_per_flop == pytest.approx(3.9 / 9e9)


def test_negative_coefficient_falls_back_to_one_term() -> None:
    # More FLOPs, fewer seconds: a two-term fit would need a negative seconds per FLOP.
    records = [record(flops=10**9, steps=10, train_s=2.0), record(flops=2 * 10**9, steps=5, train_s=1.0)]
    a, b = fit_time(records)
    assert a >= 0 and b >= 0
    assert (a, b) == (0.0, pytest.approx(0.2))  # seconds per step fits both exactly


def test_energy_from_measured_power_only() -> None:
    """Energy follows the records' mean power where rapl or nvml measured it (50 W here), even when the time
    rests on a more specific match; estimated energy never calibrates."""
    records = [
        record("m", "green", train_s=1.0, energy_method="estimate", energy_j=1e6),
        record("m", "full", train_s=2.0, energy_method="rapl", energy_j=100.0),
    ]
    cal = calibrate(records, "m", "green", PROFILE)
    assert cal.time_basis.match == "device+model+method"
    assert cal.energy_basis.basis == "measured"
    assert cal.energy_basis.match == "device+model"
    assert cal.energy_basis.epochs == 1
    assert cal.energy_j(10**9, 10) == pytest.approx(50.0 * 1.0)
    only_estimated = calibrate(records[:1], "m", "green", PROFILE)
    assert only_estimated.energy_basis.basis == "declared"
    assert only_estimated.energy_j(1e12, 10) == pytest.approx(200.0)


def test_record_of_an_epoch_leaves_out_validation() -> None:
    report = EpochReport(
        epoch=1,
        selected_tensors=[],
        flops={"total": 5},
        rho_achieved=1.0,
        tokens=7,
        wall_s=3.0,
        train_loss=None,
        valid_loss=None,
        valid_accuracy=None,
        valid_token_accuracy=None,
        energy_j=1.0,
        energy_method="rapl",
        gco2e=0.0,
        steps=2,
        valid_wall_s=1.0,
        device_name="box",
    )
    r = Throughput.of_epoch(report, "box", "m", "green")
    assert (r.flops, r.steps, r.train_s, r.wall_s, r.tokens) == (5, 2, 2.0, 3.0, 7)


def test_records_alike_time_only_runs_like_them() -> None:
    """Epochs of green at one budget (alike FLOPs per step) cannot time green at another budget, whose steps
    are cheaper: the model's other methods together, which tell seconds per FLOP from seconds per step, do;
    a run like the green records rests on them."""
    a, b = 1 / 2e9, 0.01
    green = [record(flops=7 * 10**9, steps=10, train_s=a * 7e9 + b * 10 + 0.1 * i) for i in range(3)]
    others = [
        record(method=m, flops=f, steps=10, train_s=a * f + b * 10)
        for m, f in (("full", 10**10), ("lora", 6 * 10**9))
    ]
    cal = calibrate(green + others, "m", "green", PROFILE)
    half = (5 * 10**9, 10)  # green at rho 0.5: its steps' FLOPs are outside the green records'
    assert cal.basis_for(*half).match == "device+model" and cal.basis_for(*half).epochs == 5
    assert cal.time_s(*half) == pytest.approx(a * 5e9 + b * 10, rel=0.05)  # the green records add noise
    alike = (int(7.2 * 10**9), 10)  # within 5% of theirs
    assert cal.basis_for(*alike).match == "device+model+method" == cal.time_basis.match
    # no broader level that can tell the terms apart: the most specific stands
    only_green = calibrate(green, "m", "green", PROFILE)
    assert only_green.basis_for(*half).match == "device+model+method"
