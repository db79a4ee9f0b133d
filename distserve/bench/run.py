"""One benchmark run (a workload at one rate) and a goodput sweep over rates, against a
live server; results in the shared format."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from distserve.bench.client import run_workload, server_layout, server_model
from distserve.metrics.goodput import goodput, goodput_interval
from distserve.metrics.results import RequestResult, write_results
from distserve.metrics.slo import attainment, met_both, min_slo_scale
from distserve.metrics.summary import summarize
from distserve.model.metadata import tokenizer_for
from distserve.workload.build import WorkloadSpec, build_workload


async def bench_once(
    base_url: str,
    spec: WorkloadSpec,
    ttft_slo: float,
    tpot_slo: float,
    model: str | None = None,
    api_key: str | None = None,
    output: str | None = None,
    progress: bool = True,
    tokenizer: Any = None,
    label: str | None = None,
) -> tuple[dict[str, Any], list[RequestResult]]:
    """Run `spec` once; return (summary, per-request results) and write the results file.
    `label` names the server's layout (default: what its /health says, e.g. 1P1D)."""
    served = await server_model(base_url, api_key)
    label = label or await server_layout(base_url, api_key)
    tokenizer = tokenizer or tokenizer_for(model or served)
    workload = build_workload(spec, tokenizer)
    results, elapsed = await run_workload(
        base_url,
        workload,
        served,
        api_key,
        progress=progress,
        desc=f"{label} @ {spec.rate:g} req/s",
    )
    summary = summarize(results, ttft_slo, tpot_slo, elapsed)
    for kind in ("both", "ttft", "tpot"):
        summary.setdefault("min_slo_scale", {})[kind] = min_slo_scale(
            results, ttft_slo, tpot_slo, 0.9, kind
        )
    config = {
        "base_url": base_url,
        "layout": label,
        "model": served,
        "workload": workload.meta,
        "slo": {"ttft": ttft_slo, "tpot": tpot_slo},
    }
    if output:
        write_results(output, config, summary, results)
    return summary, results


async def goodput_sweep(
    base_url: str,
    spec: WorkloadSpec,
    rates: list[float],
    ttft_slo: float,
    tpot_slo: float,
    target: float = 0.9,
    devices: int = 1,
    model: str | None = None,
    api_key: str | None = None,
    output_dir: str | None = None,
    progress: bool = True,
    label: str | None = None,
) -> dict[str, Any]:
    """Run the workload at each rate (same requests, new arrival times) and find the
    goodput: the highest rate with attainment >= target, interpolated, with a bootstrap
    interval of the requests' own sampling noise (`goodput_interval`). `label` names the
    layout (default: the server's /health, e.g. 1P1D) in the progress bars and the result."""
    served = await server_model(base_url, api_key)
    label = label or await server_layout(base_url, api_key)
    tokenizer = tokenizer_for(model or served)
    points, runs, met = [], [], []
    for rate in sorted(rates):
        out = os.path.join(output_dir, f"rate-{rate:g}.json") if output_dir else None
        s, results = await bench_once(
            base_url,
            dataclasses.replace(spec, rate=rate),
            ttft_slo,
            tpot_slo,
            model,
            api_key,
            out,
            progress,
            tokenizer,
            label,
        )
        att = s["attainment"]["both"]
        points.append((rate, att))
        met.append((rate, met_both(results, ttft_slo, tpot_slo)))
        runs.append(
            {
                "rate": rate,
                "attainment": s["attainment"],
                "ttft_p90": s["ttft"]["p90"],
                "tpot_p90": s["tpot"]["p90"],
                "file": out,
            }
        )
        if progress:
            a = s["attainment"]
            print(
                f"{label} @ {rate:g} req/s: attainment {100 * att:.1f}% "
                f"(TTFT {100 * a['ttft']:.1f}%, TPOT {100 * a['tpot']:.1f}%)",
                flush=True,
            )
    g = goodput(points, target)
    lo, hi = goodput_interval(met, target)
    return {
        "layout": label,
        "dataset": spec.dataset,
        "goodput": g,
        "per_device_goodput": g / devices,
        "goodput_interval": [lo, hi],
        "per_device_goodput_interval": [lo / devices, hi / devices],
        "devices": devices,
        "target": target,
        "points": points,
        "runs": runs,
        "slo": {"ttft": ttft_slo, "tpot": tpot_slo},
    }


def attainment_at(results: list[RequestResult], ttft_slo: float, tpot_slo: float) -> float:
    return attainment(results, ttft_slo, tpot_slo)["both"]
