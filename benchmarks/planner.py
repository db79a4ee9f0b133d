"""The planner on the paper's A100 profiles: which placement it picks, its per-GPU goodput
against the colocated baselines, and how long the search takes.

    python benchmarks/planner.py [--cases 13b-chatbot-4,66b-code-32] [--workers 2]

Each case runs Algorithm 1 with DistServe's engine coefficients for the disaggregated
search and vLLM's for the colocated baselines (as the paper compares), on ShareGPT /
HumanEval / synthetic-summarization lengths (counted with SmolLM2's tokenizer, not OPT's).
SLOs are the paper's (Table 1). The simulations run without prefix caching, as the paper's
systems did (the code workload repeats HumanEval's 164 prompts, which a cache would
mostly skip). Writes benchmarks/results/planner.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from distserve.core import SchedulerConfig
from distserve.model.metadata import tokenizer_for
from distserve.planner.phases import Setting
from distserve.planner.plan import layout_text, make_plan
from distserve.planner.search import Cluster
from distserve.sim.profile import a100_kv_capacity, bundled_a100
from distserve.workload.build import WorkloadSpec, build_workload

# name: (model, dataset, ttft, tpot, nodes, gpus per node, what the paper reports)
CASES = {
    "13b-chatbot-4": ("opt-13b", "chatbot", 0.25, 0.1, 1, 4, "prefill tp2 + decode tp1"),
    "13b-chatbot-8": ("opt-13b", "chatbot", 0.25, 0.1, 1, 8, "prefill tp2 + decode tp1"),
    "66b-chatbot-32": ("opt-66b", "chatbot", 2.5, 0.15, 4, 8, "prefill tp4 + decode tp2 pp2"),
    "66b-code-32": ("opt-66b", "code", 0.125, 0.2, 4, 8, "5.7x vLLM"),
    "66b-summarization-32": ("opt-66b", "summarization", 15.0, 0.15, 4, 8, "4.3x vLLM"),
}


def run_case(name: str, workers: int, num_requests: int, tokenizer, max_pp: int | None) -> dict:  # type: ignore[no-untyped-def]
    model, dataset, ttft, tpot, nodes, per_node, paper = CASES[name]
    spec = WorkloadSpec(dataset=dataset, num_requests=4000, rate=1.0, seed=0)
    workload = build_workload(spec, tokenizer)
    setting = Setting(
        workload,
        ttft,
        tpot,
        0.9,
        SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=2048, max_model_len=2048),
        capacity=a100_kv_capacity(),
        min_requests=num_requests,
        prefix_caching=False,  # as the paper's systems: no prompt reuses another's KV
    )
    pick = lambda engine: [p for p in bundled_a100(engine) if p.model == model]  # noqa: E731
    t0 = time.perf_counter()
    plan = make_plan(
        setting,
        pick("distserve"),
        None,
        Cluster(nodes, per_node),
        workers=workers,
        workload_meta=workload.meta,
        baseline_profiles=pick("vllm"),
        max_pp=max_pp,
    )
    seconds = time.perf_counter() - t0
    d = plan["disagg"] or {}

    colo = plan["baselines"].get("colocated") or {}
    chunk = plan["baselines"].get("chunked") or {}
    row = {
        "case": name,
        "model": model,
        "dataset": dataset,
        "slo": {"ttft": ttft, "tpot": tpot},
        "gpus": nodes * per_node,
        "disagg": layout_text(d),
        "disagg_per_gpu": d.get("per_device_goodput", 0.0),
        "colocated": layout_text(colo),
        "colocated_per_gpu": colo.get("per_device_goodput", 0.0),
        "chunked_per_gpu": chunk.get("per_device_goodput", 0.0),
        "gain_vs_colocated": (d.get("per_device_goodput", 0.0) / colo["per_device_goodput"])
        if colo.get("per_device_goodput")
        else None,
        "recommended": plan["recommended"],
        "paper": paper,
        "max_pp": max_pp,
        "search_seconds": seconds,
        "algorithm_seconds": plan["seconds_by_phase"]["algorithm"],
        "plan": plan,
    }
    gain = row["gain_vs_colocated"]
    print(
        f"{name:22s} {row['disagg']:32s} {row['disagg_per_gpu']:.3f}/GPU | colocated "
        f"{row['colocated']:14s} {row['colocated_per_gpu']:.3f}/GPU | gain "
        f"{gain if gain is None else round(gain, 2)} | paper: {paper} | {seconds:.1f} s "
        f"(Algorithm 1: {row['algorithm_seconds']:.1f} s)",
        flush=True,
    )
    return row


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated cases (default: all)")
    ap.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="search processes (default: all)"
    )
    ap.add_argument(
        "--num-requests", type=int, default=300, help="requests per simulation at least"
    )
    ap.add_argument(
        "--max-pp",
        type=int,
        default=None,
        help="highest pipeline degree searched (default: any; 1: tensor parallelism only)",
    )
    ap.add_argument("--output", default="benchmarks/results/planner.json", help="results JSON")
    args = ap.parse_args()
    tokenizer = tokenizer_for("smollm2-135m")
    rows = []
    names = args.cases.split(",")
    for name in names:
        if name not in CASES:
            ap.error(f"--cases: unknown case {name!r} (choose from {', '.join(CASES)})")
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    for name in names:
        rows.append(run_case(name, args.workers, args.num_requests, tokenizer, args.max_pp))
        with open(args.output, "w") as f:  # after every case: a long run keeps what it did
            json.dump({"workers": args.workers, "cases": rows}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
