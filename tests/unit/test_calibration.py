"""A calibration's serving path, with and without the contention it read, and the form
results files keep it in."""

from __future__ import annotations

from distserve.bench.calibrate import Calibration
from distserve.sim.serving_path import ServingPath


def test_calibration_serving_path_with_and_without_contention() -> None:
    total = ServingPath(step_overhead=0.003, compute_scale=1.05, decode_scale=1.2)
    cal = Calibration(total, contention={"prefill": (1.0, 1.1), "decode": (1.15, None)})
    assert cal.serving_path(contention=False) == total
    # decode has no contended reading: its total stays, unsplit
    assert cal.serving_path() == ServingPath(
        step_overhead=0.003, compute_scale=1.0, contended_scale=1.1, decode_scale=1.2
    )
    lone = Calibration(ServingPath(decode_seq_time=0.002))
    assert lone.serving_path() == lone.path and lone.path.decode_scale is None


def test_a_saved_calibration_loads_and_is_written_back_the_same() -> None:
    saved = {
        "compute_scale": 0.97,
        "step_overhead": 0.003,
        "decode_scale": 0.86,
        "lone": [0.93, 0.84],
        "contention": {"prefill": [0.94, 1.02], "decode": [0.86, None]},
        "decode_seq_time": 0.00012,
    }
    cal = Calibration.from_dict(saved)
    assert cal.path == ServingPath(
        step_overhead=0.003, compute_scale=0.97, decode_scale=0.86, decode_seq_time=0.00012
    )
    assert cal.to_dict() == saved
    # runs from before the loaded calibration: the totals only
    early = {"compute_scale": 1.1, "step_overhead": 0.004}
    assert Calibration.from_dict(early).to_dict() == early | {
        "decode_scale": None,
        "lone": None,
        "contention": None,
        "decode_seq_time": 0.0,
    }
