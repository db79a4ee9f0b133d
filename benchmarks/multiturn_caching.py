"""Prefix caching on multi-turn sessions: goodput with and without it, measured and simulated.

    python benchmarks/multiturn_caching.py [--rounds 2] [--rates 0.2,0.4,0.7] [--sessions 20]
        [--profile /tmp/smollm2-1core.json]

SmolLM2 on the machine's 2 cores, each instance owning one: 1P1D (`serve --mode disagg`)
and 2 colocated instances (`serve --mode colocated --instances 2`), each with prefix
caching and the KV store (`--kv-store-gb 1`) and without (`--no-prefix-caching`). Every
round starts each of the four servers in turn (the order reversed every other round, so a
drift of the shared machine's speed does not favour one) and drives it with ShareGPT
sessions (`--dataset conversations`: closed loop, think times) at each session rate.
Each rate uses its own conversations (seed + rate index): a server keeps its cache from
one rate to the next, and the same conversations again would hit it from the first turn.

Per run: SLO attainment, later turns' TTFT p50/p90, the share of prompt tokens the cache
supplied, and the KV store's counters from /metrics (written bytes, blocks shared and
loaded). Per variant: goodput (sessions/s at >= 90% attainment, interpolated) per core
(/ 2). Also the workload's cacheable share (prompt tokens in full blocks that an earlier
prompt of the same run began with: the most any prefix cache can supply) and the
simulator's prediction of the same requests (`distserve simulate --dataset conversations`
with the same mode and caching flags and a 1-core profile). Writes
benchmarks/results/multiturn_caching.json; per-request results go to --details-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx

from distserve.bench.client import server_model
from distserve.bench.run import bench_once
from distserve.bench.runs import details_dir_for
from distserve.bench.server_process import running_server
from distserve.metrics.goodput import goodput
from distserve.metrics.results import read_results
from distserve.model.metadata import tokenizer_for
from distserve.workload.build import WorkloadSpec, build_workload

CORES = 2
KV_GB = 0.5
"""KV cache per instance: ~20k tokens of SmolLM2 bf16, so a session's earlier turns stay
cached while about 20 sessions are active."""
VARIANTS = {
    "1P1D cached": ("disagg", True, ["--mode", "disagg", "--kv-store-gb", "1"]),
    "1P1D no-cache": ("disagg", False, ["--mode", "disagg", "--no-prefix-caching"]),
    "colocated-2x1 cached": (
        "colocated",
        True,
        ["--mode", "colocated", "--instances", "2", "--kv-store-gb", "1"],
    ),
    "colocated-2x1 no-cache": (
        "colocated",
        False,
        ["--mode", "colocated", "--instances", "2", "--no-prefix-caching"],
    ),
}
STOP_BELOW = 0.5
"""A sweep skips its higher rates once attainment fell below this."""
SIM_PATH = ["--step-overhead", "0.0035", "--compute-scale", "1.1", "--decode-scale", "1.4"]
"""The serving path's costs outside the profiled model, as benchmarks/sim_fidelity.py
calibrated them on this machine (1P1D: 3.6 ms a step, prefill x1.11, decode x1.42)."""


def spec_at(args: argparse.Namespace, rate: float, index: int) -> WorkloadSpec:
    return WorkloadSpec(
        dataset="conversations",
        num_requests=args.sessions,
        rate=rate,
        seed=args.seed + index,
        max_prompt_len=args.max_prompt_len,
        max_output_len=args.max_output_len,
        max_turns=args.max_turns,
        think_time=args.think_time,
    )


def rate_seeds(args: argparse.Namespace) -> list[tuple[float, int]]:
    """(rate, seed index) of every rate a sweep may run: the lower one (half the lowest,
    run where the lowest misses 90%) first, with its own conversations."""
    rates = sorted(args.rates)
    return [(round(rates[0] / 2, 4), len(rates)), *((r, i) for i, r in enumerate(rates))]


def cacheable_share(spec: WorkloadSpec, tokenizer: Any, block: int = 16) -> dict[str, Any]:
    """Prompt tokens in full blocks that an earlier prompt (nominal arrival order) began
    with, over all prompt tokens: what an unbounded prefix cache could supply."""
    wl = build_workload(spec, tokenizer)
    seen: set[tuple[int, ...]] = set()
    cached = total = later_cached = later_total = 0
    for req in sorted(wl.requests, key=lambda r: r.arrival):
        ids = req.prompt_token_ids
        full = len(ids) // block
        hit = 0
        # a hit may not cover the whole prompt (the last token is always computed)
        while hit < full and (hit + 1) * block < len(ids) and ids[: (hit + 1) * block] in seen:
            hit += 1
        for k in range(1, full + 1):
            seen.add(ids[: k * block])
        cached += hit * block
        total += len(ids)
        if req.turn > 0:
            later_cached += hit * block
            later_total += len(ids)
    return {
        "turns": len(wl.requests),
        "prompt_tokens": total,
        "cacheable_share": cached / total,
        "later_turns_cacheable_share": later_cached / later_total if later_total else None,
        "prompt_mean": total / len(wl.requests),
    }


def scrape(url: str) -> dict[str, float]:
    """/metrics summed over label sets, for the counters this benchmark reports."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith("distserve_"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        value = float(line.rsplit(" ", 1)[1])
        if name == "distserve_kv_blocks":
            if 'state="free"' in line or 'state="cached"' in line or 'state="used"' in line:
                out["kv_blocks_total"] = out.get("kv_blocks_total", 0.0) + value
            continue
        out[name] = out.get(name, 0.0) + value
    return out


COUNTERS = (
    "distserve_prefix_cache_prompt_tokens_total",
    "distserve_prefix_cache_hit_tokens_total",
    "distserve_kv_store_written_bytes_total",
    "distserve_kv_store_shared_blocks_total",
    "distserve_kv_store_loaded_blocks_total",
    "distserve_kv_store_evictions_total",
)


def run_row(
    summary: dict[str, Any], before: dict[str, Any], after: dict[str, Any], rate: float
) -> dict[str, Any]:
    later = summary.get("turns", {}).get("later", {})
    first = summary.get("turns", {}).get("first", {})
    cache = summary.get("prefix_cache") or {}
    return {
        "rate": rate,
        "attainment": summary["attainment"],
        "errors": summary["errors"],
        "turns": summary["num_requests"],
        "duration_s": summary["duration_s"],
        "first_ttft": first.get("ttft"),
        "later_ttft": later.get("ttft"),
        "later_prompt_mean": later.get("prompt_mean"),
        "cached_share": cache.get("hit_share"),
        "later_cached_share": (later.get("prefix_cache") or {}).get("hit_share"),
        "metrics": {k.removeprefix("distserve_"): after.get(k, 0.0) - before.get(k, 0.0)
                    for k in COUNTERS},
    }  # fmt: skip


async def measure_variant(
    name: str, args: argparse.Namespace, round_no: int, tokenizer: Any, report: dict[str, Any]
) -> dict[str, Any]:
    _, _, flags = VARIANTS[name]
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    with running_server(*flags, kv_cache_gb=KV_GB) as url:
        model = await server_model(url)
        before = scrape(url)
        report.setdefault("kv_blocks_per_instance", before.get("kv_blocks_total", 0) / CORES)
        below, *sweep = rate_seeds(args)
        queue = list(sweep)
        while queue:
            rate, i = queue.pop(0)
            top = max(rows, key=lambda r: r["rate"]) if rows else None
            if top and top["attainment"]["both"] < STOP_BELOW and rate > top["rate"]:
                print(f"  {name:24s} {rate:5.2f} sess/s: skipped (far past saturation)")
                continue
            out = os.path.join(
                args.details_dir, f"r{round_no}-{name.replace(' ', '_')}-{rate:g}.json"
            )
            summary, _ = await bench_once(
                url,
                spec_at(args, rate, i),
                args.ttft_slo,
                args.tpot_slo,
                model,
                output=out,
                progress=False,
                tokenizer=tokenizer,
                label=name,
            )
            after = scrape(url)
            row = run_row(summary, before, after, rate)
            before = after
            rows.append(row)
            if rate == sweep[0][0] and row["attainment"]["both"] < 0.9:
                queue.insert(0, below)  # no goodput without a rate that meets the target
            lt = row["later_ttft"] or {}
            m = row["metrics"]
            print(
                f"  {name:24s} {rate:5.2f} sess/s: both {100 * row['attainment']['both']:5.1f}%"
                f"  later TTFT p50/p90 {_ms(lt.get('p50'))}/{_ms(lt.get('p90'))} ms"
                f"  cached {_pct(row['cached_share'])}  store loaded"
                f" {m['kv_store_loaded_blocks_total']:.0f} blk,"
                f" written {m['kv_store_written_bytes_total'] / 2**20:.0f} MiB",
                flush=True,
            )
    rows.sort(key=lambda r: r["rate"])
    points = [(r["rate"], r["attainment"]["both"]) for r in rows]
    g = goodput(points, 0.9)
    return {
        "round": round_no,
        "rows": rows,
        "goodput": g,
        "per_core_goodput": g / CORES,
        "seconds": time.time() - t0,
    }


def simulate(
    name: str, args: argparse.Namespace, profile: str, blocks: int, path: list[str] = SIM_PATH
) -> list[dict[str, Any]]:
    """The simulator's prediction of the same requests (`distserve simulate`), per rate,
    on the serving path `path` (simulate's flags; SIM_PATH by default)."""
    mode, cached, _ = VARIANTS[name]
    rows = []
    for rate, i in rate_seeds(args):
        spec = spec_at(args, rate, i)
        tag = os.path.splitext(os.path.basename(profile))[0]
        out = os.path.join(args.details_dir, f"sim-{tag}-{name.replace(' ', '_')}-{rate:g}.json")
        cmd = [sys.executable, "-m", "distserve.cli", "simulate", "--profile", profile,
               "--mode", mode, *(["--instances", "2"] if mode == "colocated" else []),
               *(["--kv-store-gb", "1"] if cached else ["--no-prefix-caching"]),
               "--num-blocks", str(blocks), *path,
               "--dataset", "conversations", "--num-requests", str(spec.num_requests),
               "--rate", str(rate), "--seed", str(spec.seed), "--max-turns", str(spec.max_turns),
               "--think-time", str(spec.think_time),
               "--max-prompt-len", str(spec.max_prompt_len),
               "--max-output-len", str(spec.max_output_len),
               "--ttft-slo", str(args.ttft_slo), "--tpot-slo", str(args.tpot_slo),
               "--output", out]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        _, summary, _ = read_results(out)
        later = summary.get("turns", {}).get("later", {})
        rows.append(
            {
                "rate": rate,
                "attainment": summary["attainment"],
                "later_ttft": later.get("ttft"),
                "cached_share": (summary.get("prefix_cache") or {}).get("hit_share"),
                "command": " ".join(["distserve", *cmd[3:]]),
            }
        )
    g = goodput([(r["rate"], r["attainment"]["both"]) for r in rows], 0.9)
    return [{"rows": rows, "goodput": g, "per_core_goodput": g / CORES}]


def aggregate(report: dict[str, Any]) -> dict[str, Any]:
    """Per variant, over the rounds: mean attainment per rate, mean per-core goodput,
    median of the later-turn TTFT percentiles."""
    table = {}
    for name, rounds in report["measured"].items():
        if not rounds:
            continue
        by_rate: dict[float, list[dict[str, Any]]] = {}
        for rnd in rounds:
            for row in rnd["rows"]:
                by_rate.setdefault(row["rate"], []).append(row)
        per_rate = {}
        for rate, rows in sorted(by_rate.items()):
            lt = [r["later_ttft"] for r in rows if r["later_ttft"] and r["later_ttft"]["p50"]]
            per_rate[rate] = {
                "attainment": statistics.mean(r["attainment"]["both"] for r in rows),
                "later_ttft_p50": statistics.median(x["p50"] for x in lt) if lt else None,
                "later_ttft_p90": statistics.median(x["p90"] for x in lt) if lt else None,
                "cached_share": statistics.mean(r["cached_share"] or 0.0 for r in rows),
                "store": {
                    k: statistics.mean(r["metrics"][k] for r in rows) for k in rows[0]["metrics"]
                },
                "runs": len(rows),
            }
        # goodput of the mean curve: a rate skipped in a round past saturation counts as
        # 0 attainment there; the lower rate, run only where needed, as measured
        points = []
        for rate in sorted(by_rate):
            atts = []
            for rnd in rounds:
                got = {r["rate"]: r["attainment"]["both"] for r in rnd["rows"]}
                if rate in got:
                    atts.append(got[rate])
                elif rate > max(got):
                    atts.append(0.0)
            points.append((rate, statistics.mean(atts)))
        g = goodput(points, 0.9)
        table[name] = {
            "per_rate": per_rate,
            "per_core_goodput": g / CORES,
            "per_core_goodput_by_round": [r["per_core_goodput"] for r in rounds],
        }
        sims = report.get("simulated", {})
        table[name]["simulated_per_core_goodput"] = {
            path: by_variant[name][0]["per_core_goodput"] for path, by_variant in sims.items()
        }
    return table


def print_table(report: dict[str, Any]) -> None:
    table = report.get("table", {})
    print(
        f"\nSLO TTFT {report['slo']['ttft']} s, TPOT {report['slo']['tpot']} s; attainment "
        "measured (simulated); later turns' TTFT p50/p90 ms; cached share of prompt tokens"
    )
    for name, t in table.items():
        sims = [
            {r["rate"]: r for r in by_variant[name][0]["rows"]}
            for by_variant in report.get("simulated", {}).values()
        ]
        for rate, v in t["per_rate"].items():
            s_att = " ".join(
                f"({100 * s[rate]['attainment']['both']:5.1f}%)" for s in sims if rate in s
            )
            print(
                f"  {name:24s} {rate:5.2f}: {100 * v['attainment']:5.1f}% {s_att:19s}"
                f" {_ms(v['later_ttft_p50'])}/{_ms(v['later_ttft_p90'])}"
                f"  cached {_pct(v['cached_share'])}"
            )
        sim_g = " / ".join(f"{g:.3f}" for g in t.get("simulated_per_core_goodput", {}).values())
        print(
            f"  {name:24s} per-core goodput {t['per_core_goodput']:.3f} sess/s"
            f" (rounds {', '.join(f'{g:.3f}' for g in t['per_core_goodput_by_round'])})"
            + (f", simulated {sim_g}" if sim_g else "")
        )
    for mode in ("1P1D", "colocated-2x1"):
        c, n = table.get(f"{mode} cached"), table.get(f"{mode} no-cache")
        if c and n and n["per_core_goodput"] > 0:
            print(f"  {mode}: caching x{c['per_core_goodput'] / n['per_core_goodput']:.2f}")


def _ms(x: float | None) -> str:
    return f"{1000 * x:5.0f}" if x is not None else "    -"


def _pct(x: float | None) -> str:
    return f"{100 * x:4.1f}%" if x is not None else "  -"


def save(report: dict[str, Any], path: str) -> None:
    report["table"] = aggregate(report)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tokenizer = tokenizer_for("smollm2-135m")
    report: dict[str, Any] = {}
    if os.path.exists(args.output) and (args.sim_only or args.resume):
        with open(args.output) as f:
            report = json.load(f)
    report.setdefault("measured", {name: [] for name in VARIANTS})
    report.update(
        command=" ".join(["python", *sys.argv]),
        slo={"ttft": args.ttft_slo, "tpot": args.tpot_slo},
        rates=args.rates,
        workload=dataclasses.asdict(spec_at(args, args.rates[0], 0)) | {"rate": "per rate"},
        kv_cache_gb=KV_GB,
    )
    report["cacheable"] = {
        str(rate): cacheable_share(spec_at(args, rate, i), tokenizer)
        for rate, i in rate_seeds(args)
    }
    for rate, c in report["cacheable"].items():
        print(
            f"rate {rate}: {c['turns']} turns, mean prompt {c['prompt_mean']:.0f} tokens, "
            f"cacheable {_pct(c['cacheable_share'])} (later turns "
            f"{_pct(c['later_turns_cacheable_share'])})",
            flush=True,
        )
    if not args.sim_only:
        chosen = [v for v in VARIANTS if v in args.variants]
        done = min(len(report["measured"][v]) for v in chosen)
        for rnd in range(done, done + args.rounds):
            order = chosen if rnd % 2 == 0 else list(reversed(chosen))
            load = os.getloadavg()[0]
            print(f"round {rnd + 1}: {', '.join(order)} (load average {load:.1f})", flush=True)
            for name in order:
                result = await measure_variant(name, args, rnd, tokenizer, report)
                result["load_average_after"] = os.getloadavg()[0]
                report["measured"][name].append(result)
                save(report, args.output)
    if args.profile:
        blocks = int(report.get("kv_blocks_per_instance") or 0)
        report["simulated"] = {
            path: {name: simulate(name, args, path, blocks) for name in VARIANTS}
            for path in args.profile
        }
        report["sim_num_blocks"] = blocks
    save(report, args.output)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the four servers (default: 2)")
    ap.add_argument(
        "--rates", type=floats, default=[0.2, 0.4, 0.7],
        help="session arrival rates per second, comma-separated (default: 0.2,0.4,0.7)",
    )  # fmt: skip
    ap.add_argument("--sessions", type=int, default=20, help="sessions per rate (default: 20)")
    ap.add_argument("--max-turns", type=int, default=4, help="most turns a session (default: 4)")
    ap.add_argument(
        "--think-time", type=float, default=2.0, help="mean think time, seconds (default: 2)"
    )
    ap.add_argument(
        "--max-prompt-len", type=int, default=1024, help="longest prompt (default: 1024)"
    )
    ap.add_argument(
        "--max-output-len", type=int, default=32, help="output cap, tokens (default: 32)"
    )
    ap.add_argument("--ttft-slo", type=float, default=2.0, help="TTFT target, s (default: 2)")
    ap.add_argument("--tpot-slo", type=float, default=0.2, help="TPOT target, s (default: 0.2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first rate's workload")
    ap.add_argument(
        "--profile", default=None, type=lambda s: s.split(","),
        help="1-core profile JSONs (distserve profile --cores 1), comma-separated: the "
        "simulated prediction with each; none: no simulation",
    )  # fmt: skip
    ap.add_argument(
        "--sim-only", action="store_true",
        help="measure nothing: add the simulation to the --output of an earlier run",
    )  # fmt: skip
    ap.add_argument(
        "--variants", default=",".join(VARIANTS),
        help="comma-separated subset of the servers to measure (default: all four)",
    )  # fmt: skip
    ap.add_argument(
        "--resume", action="store_true",
        help="add --rounds more rounds to the --output of an earlier run",
    )  # fmt: skip
    ap.add_argument(
        "--output", default="benchmarks/results/multiturn_caching.json", help="summary JSON"
    )
    ap.add_argument(
        "--details-dir", default=None,
        help="per-request results (default: outside the tree, see distserve.bench.runs)",
    )  # fmt: skip
    args = ap.parse_args()
    args.variants = args.variants.split(",")
    if unknown := set(args.variants) - set(VARIANTS):
        ap.error(f"--variants: unknown {', '.join(sorted(unknown))}")
    if args.sim_only and not args.profile:
        ap.error("--sim-only needs --profile")
    args.details_dir = args.details_dir or details_dir_for(args.output)
    os.makedirs(args.details_dir, exist_ok=True)
    t0 = time.time()
    report = asyncio.run(main_async(args))
    print_table(report)
    print(f"done in {(time.time() - t0) / 60:.1f} min; {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
