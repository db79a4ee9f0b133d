"""Why the simulator looked pessimistic for 1P1D without caching on the multi-turn runs
(issue 22): the machine ran those runs about 2.3x faster than the profile.

    python benchmarks/multiturn_speed.py [--profile benchmarks/results/smollm2-1core-amd-epyc.json]
        [--speed CS:DS ...] [--output benchmarks/results/multiturn_speed.json]

No server: it reads the README's measured runs (1P1D: multiturn_caching-1p1d-rerun.json;
colocated: multiturn_caching.json) and
1. bounds the run's prefill speed from the measurements alone: a turn's TTFT is at least
   its own prefill, and prefill time grows with the prompt, so the median TTFT of the
   later turns of a run without caching is at least the prefill time of the median later
   prompt; set against the simulator's time for that prompt (the profile on
   multiturn_caching.py's SIM_PATH, the forecast's serving path);
2. simulates the same requests again as multiturn_caching.py does (same commands), on
   SIM_PATH (the forecast in the README) and on SIM_PATH with its prefill and decode
   scales times the machine's speed that day: the ratio of a one-core step measured then
   (`FAST`) to the profile's time for the same step. `--speed CS:DS` adds other
   prefill:decode scales.
Writes --output; the simulator's per-request files go to --details-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from multiturn_caching import SIM_PATH, VARIANTS, simulate, spec_at  # noqa: E402

from distserve.metrics.summary import percentile  # noqa: E402
from distserve.model.metadata import tokenizer_for  # noqa: E402
from distserve.sim.latency import latency_model  # noqa: E402
from distserve.sim.profile import load_profiles  # noqa: E402
from distserve.sim.serving_path import ServingPath  # noqa: E402
from distserve.workload.build import build_workload  # noqa: E402

RESULTS = "benchmarks/results"
MEASURED = {  # the README's rows: 1P1D from the quiet re-run, colocated from the first file
    "1P1D cached": "multiturn_caching-1p1d-rerun.json",
    "1P1D no-cache": "multiturn_caching-1p1d-rerun.json",
    "colocated-2x1 cached": "multiturn_caching.json",
    "colocated-2x1 no-cache": "multiturn_caching.json",
}
FAST = {
    "prefill_512_ms": 291.48,
    "decode_8x512_ms": 23.21,
    "source": "benchmarks/results/kv_store.json (python benchmarks/kv_store.py --rounds 7: "
    "one worker pinned to core 0, medians of 7; committed 2026-12-05 12:38 UTC; the "
    "multi-turn runs were made between 12:29, when serve --kv-store-gb came, and 14:06)",
}
"""One-core steps measured on the day of the multi-turn runs. The same steps in the slow
phase of this VM: 632 ms (kv_store_layerwise.json, 2026-12-05 22:25) and 606 ms (the
profiler's path, 2026-12-06 03:43); the profile (2026-12-03) has 642 ms."""


def path_flags(cs: float, ds: float) -> list[str]:
    """SIM_PATH with its prefill and decode scales replaced."""
    flags = list(SIM_PATH)
    flags[flags.index("--compute-scale") + 1] = f"{cs:.4g}"
    flags[flags.index("--decode-scale") + 1] = f"{ds:.4g}"
    return flags


def flag(name: str) -> float:
    return float(SIM_PATH[SIM_PATH.index(name) + 1])


def workload_args(report: dict[str, Any], details_dir: str) -> argparse.Namespace:
    """multiturn_caching.py's arguments for the runs in `report`."""
    w = report["workload"]
    return argparse.Namespace(
        sessions=w["num_requests"], seed=w["seed"], max_prompt_len=w["max_prompt_len"],
        max_output_len=w["max_output_len"], max_turns=w["max_turns"],
        think_time=w["think_time"], rates=report["rates"], ttft_slo=report["slo"]["ttft"],
        tpot_slo=report["slo"]["tpot"], details_dir=details_dir,
    )  # fmt: skip


def bound(
    report: dict[str, Any], args: argparse.Namespace, profile: Any, tokenizer: Any
) -> list[dict[str, Any]]:
    """Per no-cache run: the median later prompt, the forecast's prefill time for it alone,
    and the measured median later-turn TTFT (an upper bound of the real prefill time)."""
    lm = latency_model(
        profile,
        ServingPath(
            step_overhead=flag("--step-overhead"),
            compute_scale=flag("--compute-scale"),
            decode_scale=flag("--decode-scale"),
        ),
    )
    out = []
    for name in ("1P1D no-cache", "colocated-2x1 no-cache"):
        measured = load(MEASURED[name])["table"][name]["per_rate"]
        for i, rate in enumerate(args.rates):
            wl = build_workload(spec_at(args, rate, i), tokenizer)
            later = [r.prompt_len for r in wl.requests if r.turn > 0]
            median = percentile(later, 50)
            assert median is not None
            sim = lm.phase_time([(0, round(median))], [])
            ttft = measured[str(rate)]["later_ttft_p50"]
            out.append(
                {
                    "variant": name,
                    "rate": rate,
                    "later_turns": len(later),
                    "median_later_prompt": median,
                    "forecast_prefill_s": sim,
                    "measured_later_ttft_p50_s": ttft,
                    "speed_at_least": sim / ttft,
                }
            )
    return out


def load(name: str) -> dict[str, Any]:
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)  # type: ignore[no-any-return]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--profile", default=f"{RESULTS}/smollm2-1core-amd-epyc.json")
    ap.add_argument("--speed", action="append", default=[], help="CS:DS, more scales to try")
    ap.add_argument("--output", default=f"{RESULTS}/multiturn_speed.json")
    ap.add_argument("--details-dir", default="/tmp/multiturn_speed")
    a = ap.parse_args()
    report = load("multiturn_caching.json")
    blocks = int(report["sim_num_blocks"])
    args = workload_args(report, a.details_dir)
    (profile,) = load_profiles(a.profile)
    lm = latency_model(profile, ServingPath())
    ratios = {
        "prefill": FAST["prefill_512_ms"] / 1000 / lm.phase_time([(0, 512)], []),
        "decode": FAST["decode_8x512_ms"] / 1000 / lm.phase_time([], [512] * 8),
    }
    cs, ds = flag("--compute-scale"), flag("--decode-scale")
    speeds = {"forecast (SIM_PATH)": (cs, ds), "that day's speed": (
        cs * ratios["prefill"], ds * ratios["decode"])}  # fmt: skip
    for s in a.speed:
        c, d = (float(x) for x in s.split(":"))
        speeds[f"scales {c}:{d}"] = (c, d)
    print(
        f"that day: prefill {ratios['prefill']:.3f}x, decode {ratios['decode']:.3f}x the "
        f"profile's time ({FAST['source']})"
    )
    bounds = bound(report, args, profile, tokenizer_for("smollm2-135m"))
    for b in bounds:
        print(
            f"  {b['variant']:24s} {b['rate']}: median later prompt "
            f"{b['median_later_prompt']:.0f} tokens, forecast prefill alone "
            f"{1000 * b['forecast_prefill_s']:.0f} ms > measured later TTFT p50 "
            f"{1000 * b['measured_later_ttft_p50_s']:.0f} ms: the run was >= "
            f"{b['speed_at_least']:.2f}x as fast"
        )
    rows: dict[str, dict[str, Any]] = {}
    for label, (c, d) in speeds.items():
        sub = argparse.Namespace(**vars(args))
        sub.details_dir = os.path.join(a.details_dir, f"{c:.4g}-{d:.4g}")
        os.makedirs(sub.details_dir, exist_ok=True)
        for name in VARIANTS:
            measured = load(MEASURED[name])["table"][name]["per_rate"]
            (sim,) = simulate(name, sub, a.profile, blocks, path_flags(c, d))
            for row in sim["rows"]:
                m = measured.get(str(row["rate"]))
                if m is None:
                    continue
                r = rows.setdefault(name, {}).setdefault(str(row["rate"]), {"measured": {
                    "attainment": m["attainment"], "later_ttft_p50": m["later_ttft_p50"],
                    "later_ttft_p90": m["later_ttft_p90"]}})  # fmt: skip
                lt = row["later_ttft"] or {}
                r[label] = {
                    "compute_scale": c,
                    "decode_scale": d,
                    "attainment": row["attainment"]["both"],
                    "later_ttft_p50": lt.get("p50"),
                    "later_ttft_p90": lt.get("p90"),
                    "command": row["command"],
                }
    print("\nattainment measured | simulated: " + " | ".join(speeds) + "; later TTFT p50/p90 ms")
    for name, by_rate in rows.items():
        for rate, r in by_rate.items():
            cells = [r["measured"], *(r[k] for k in speeds)]
            print(
                f"  {name:24s} {rate}: "
                + " | ".join(
                    f"{100 * x['attainment']:5.1f}% {1000 * x['later_ttft_p50']:5.0f}/"
                    f"{1000 * x['later_ttft_p90']:5.0f}"
                    for x in cells
                )
            )
    result = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "profile": a.profile,
        "that_day": {**FAST, "ratio_to_profile": ratios},
        "speeds": {k: {"compute_scale": c, "decode_scale": d} for k, (c, d) in speeds.items()},
        "bound": bounds,
        "rows": rows,
    }
    with open(a.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
