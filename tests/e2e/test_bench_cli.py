"""`distserve bench` and `distserve goodput` against a real server (1P1D, Ray actors)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distserve.bench.server_process import running_server

pytestmark = pytest.mark.slow  # starts a real server (Ray actors, the real model)

SMALL = ["--dataset", "random", "--prompt-len", "16,64", "--output-len", "4,8", "--no-progress"]


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return tmp_path_factory.mktemp("trace") / "steps.jsonl"


@pytest.fixture(scope="module")
def url(trace):
    with running_server("--mode", "disagg", "--trace-steps", str(trace)) as u:
        yield u


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distserve.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_bench_writes_results(url, trace, tmp_path) -> None:
    out = tmp_path / "r.json"
    r = _cli(
        "bench",
        "--base-url",
        url,
        *SMALL,
        "--num-requests",
        "8",
        "--rate",
        "4",
        "--ttft-slo",
        "30",
        "--tpot-slo",
        "5",
        "--output",
        str(out),
        "--label",
        "my layout",
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert set(data) == {"config", "summary", "requests"}
    assert data["config"]["layout"] == "my layout"
    s, reqs = data["summary"], data["requests"]
    assert s["completed"] == 8 and s["errors"] == 0
    assert s["attainment"]["both"] == 1.0  # targets far above what 8 small requests need
    assert data["config"]["workload"]["spec"]["num_requests"] == 8
    for q in reqs:
        assert q["num_tokens"] == q["output_len"]  # ignore_eos + max_tokens force the length
        assert 0 < q["ttft"] <= q["e2e"]
        assert {"prefill_start", "migration_end", "decode_end"} <= set(q["server"])
    assert "migration" in s["phases_median"]

    # serve --trace-steps: every step of both instances, what ran and how long
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    prefill = [s for s in steps if s["instance"] == "prefill-0"]
    decode = [s for s in steps if s["instance"] == "decode-0"]
    assert prefill and decode and len(prefill) + len(decode) == len(steps)
    assert all(s["prefill"] and not s["decode"] and s["role"] == "prefill" for s in prefill)
    assert all(s["decode"] and not s["prefill"] and s["role"] == "decode" for s in decode)
    assert sum(sum(s["prefill"]) for s in prefill) >= sum(q["prompt_len"] for q in reqs)
    assert all(0 < s["exec"] <= s["seconds"] for s in steps)


def test_goodput_sweep_and_plot(url, tmp_path) -> None:
    png, out = tmp_path / "g.png", tmp_path / "g.json"
    r = _cli(
        "goodput",
        "--base-url",
        url,
        *[a for a in SMALL if a != "--no-progress"],
        "--num-requests",
        "6",
        "--rates",
        "1,50",
        "--ttft-slo",
        "30",
        "--tpot-slo",
        "5",
        "--devices",
        "2",
        "--plot",
        str(png),
        "--output",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    sweep = json.loads(out.read_text())
    assert [p[0] for p in sweep["points"]] == [1.0, 50.0]
    # the layout is named from the server's /health: each rate's bar and line, the result
    assert sweep["layout"] == "1P1D" and sweep["dataset"] == "random"
    assert "1P1D @ 1 req/s" in r.stderr and "1P1D @ 50 req/s" in r.stderr  # progress bars
    assert "1P1D @ 50 req/s: attainment" in r.stdout
    assert sweep["per_device_goodput"] == sweep["goodput"] / 2
    lo, hi = sweep["goodput_interval"]
    assert lo <= hi and sweep["per_device_goodput_interval"] == [lo / 2, hi / 2]
    if all(a == 1.0 for _, a in sweep["points"]):  # nothing to resample: no spread
        assert lo == hi == sweep["goodput"]
    assert png.stat().st_size > 1000


def test_bench_errors_are_clear(url) -> None:
    r = _cli(
        "bench", "--base-url", "http://127.0.0.1:9", *SMALL, "--ttft-slo", "1", "--tpot-slo", "1"
    )
    assert r.returncode == 1 and "http://127.0.0.1:9" in r.stderr
    r = _cli("bench", "--base-url", url, "--dataset", "trace", "--ttft-slo", "1", "--tpot-slo", "1")
    assert r.returncode == 2 and "--trace" in r.stderr
    r = _cli("bench", "--base-url", url, "--rate", "-1", "--ttft-slo", "1", "--tpot-slo", "1")
    assert r.returncode == 2 and "--rate" in r.stderr


def test_calibration_reads_the_step_trace(url, trace) -> None:
    """Calibrating on a lone request with the server's step trace: the scales are the
    trace's own ratios over the calibration's steps (the warm-up request left out)."""
    import asyncio
    import statistics

    from distserve.bench.calibrate import calibrate
    from distserve.bench.client import server_model
    from distserve.sim.profile import Profile
    from distserve.sim.trace_fit import trace_scales
    from distserve.workload import Workload, WorkloadRequest

    toy = Profile(
        "toy", "toy", prefill=(0.001, 1e-4, 0.0), decode_small=(0.002, 0.0, 0.0),
        decode_large=(0.002, 0.0, 0.0),
    )  # fmt: skip
    wl = Workload((WorkloadRequest(0, 0.0, tuple(range(100, 160)), 8),))
    before = trace.read_text().splitlines()

    async def go():
        model = await server_model(url)
        return await calibrate(url, model, toy, wl, reps=2, output_len=6, trace=str(trace))

    cal = asyncio.run(go())
    new = trace.read_text().splitlines()[len(before) :]
    prefill, decode = trace_scales(new, toy)
    assert len(prefill) == 3 and len(decode) == 3 * 5  # warm-up + 2 reps, 6 tokens each
    prefill, decode = trace_scales(new[len(new) // 3 :], toy)  # without the warm-up
    assert cal.path.compute_scale == pytest.approx(statistics.median(prefill))
    assert cal.path.decode_scale == pytest.approx(statistics.median(decode))
    assert cal.path.step_overhead >= 0


def test_calibration_under_load_takes_the_loaded_runs_scales(url, trace) -> None:
    import asyncio

    from distserve.bench.calibrate import calibrate
    from distserve.bench.client import server_model
    from distserve.sim.profile import Profile
    from distserve.sim.trace_fit import trace_fit, trace_time_ratios
    from distserve.workload import Workload, WorkloadRequest

    toy = Profile(
        "toy", "toy", prefill=(0.001, 1e-4, 0.0), decode_small=(0.002, 0.0, 0.0),
        decode_large=(0.002, 0.0, 0.0),
    )  # fmt: skip
    lone = Workload((WorkloadRequest(0, 0.0, tuple(range(100, 160)), 8),))
    load = Workload(
        tuple(WorkloadRequest(i, 0.05 * i, tuple(range(200, 240 + 8 * i)), 6) for i in range(4))
    )
    sizes = []

    async def go():
        model = await server_model(url)
        cal = await calibrate(url, model, toy, lone, reps=1, output_len=4, trace=str(trace))
        sizes.append(len(trace.read_text().splitlines()))
        loaded = await calibrate(
            url, model, toy, lone, reps=1, output_len=4, trace=str(trace), load=load
        )
        return cal, loaded

    cal, loaded = asyncio.run(go())
    assert cal.lone is None
    assert loaded.lone is not None and loaded.path.step_overhead >= 0
    # the loaded run's lines: after the second calibration's two lone requests (4 tokens)
    lines = trace.read_text().splitlines()[sizes[0] + 2 * 4 :]
    assert sum(len(json.loads(line)["prefill"]) for line in lines) == len(load)
    prefill, decode = trace_time_ratios(lines, toy)
    assert loaded.path.compute_scale == pytest.approx(prefill)
    assert loaded.path.decode_scale == pytest.approx(decode)
    fit = trace_fit(lines, toy)  # the overhead between the loaded run's steps
    assert fit is not None
    assert loaded.path.step_overhead == pytest.approx(fit.path.step_overhead)
    assert loaded.contention is not None and set(loaded.contention) == {"prefill", "decode"}
    assert cal.contention is None and not cal.serving_path().contended
