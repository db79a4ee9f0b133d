"""Layer-wise KV transfer against the transfer after the forward, over gloo between two
processes (runtime/worker/layerwise.py).

    python benchmarks/layerwise_transfer.py [--rounds 5] [--lengths 512 1024 2048]
        [--output benchmarks/results/layerwise_transfer.json]

Two processes, each a Worker pinned to one core as a Ray worker is: a prefill worker
(SmolLM2, bf16, its real weights) and a decode-side worker, in one gloo group through the
same endpoint the `gloo` transport uses (runtime/worker/p2p.py). For a prompt of N tokens:

  after      the prefill step, then its blocks gathered and sent in one isend, received
             and written (what migration over gloo does today)
  layerwise  the prefill step with `ModelRunner.on_layer` set: a background thread of the
             prefill worker gathers and isends each layer's rows as the layer finishes;
             the receiver receives and writes layer by layer

Timed: from the step's start to the receiver's last write (CLOCK_MONOTONIC, shared by the
two processes), and the prefill step itself (so where the time goes shows: the step's own
slowdown from the sender, and the tail after it). Rounds alternate the variants, order
reversed every round. Every trial checks the received KV equals the sender's, bit for bit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from typing import Any

import torch

MODES = ("after", "layerwise")
TIMEOUT = 120.0


def schedule(lengths: list[int], rounds: int) -> list[tuple[int, str]]:
    """(prompt length, mode) trials: rounds interleave everything, order reversed each round."""
    one = [(n, m) for n in lengths for m in MODES]
    return [t for r in range(rounds) for t in (one if r % 2 == 0 else one[::-1])]


def run_rank(rank: int, port: int, args: argparse.Namespace, out: Any) -> None:
    import torch.distributed as dist

    from distserve.config import EngineConfig
    from distserve.core import CacheConfig
    from distserve.runtime.worker.layerwise import LayerwiseSender, layer_rows, write_layer
    from distserve.runtime.worker.synthetic import SyntheticPlans
    from distserve.runtime.worker.worker import Worker

    num_blocks = max(args.lengths) // 16 + 8
    config = EngineConfig(
        dtype="bfloat16", load_format="auto" if rank == 0 else "random",
        cache=CacheConfig(num_blocks=num_blocks),
    )  # fmt: skip
    worker = Worker(config, [args.cores[rank]])
    worker.join_group("127.0.0.1", port, rank, 2, "gloo", TIMEOUT)
    p2p, cache = worker.p2p, worker.cache
    assert p2p is not None
    layers, rows = len(cache.layers), layer_rows(cache)
    _, _, width = cache.blocks.shape
    plans = SyntheticPlans(num_blocks, cache.block_size, worker.info().model_config.vocab_size)
    sender = LayerwiseSender(cache, lambda i, t: p2p.post_send(tag + i, t, 1))
    tag, results = 0, []
    for n, mode in schedule(args.lengths, args.rounds):
        nb = -(-n // cache.block_size)
        if rank == 0:
            plans.release()
            plan = plans.prefill(n, 1)
            blocks = list(plan.chunks[0].block_table)
            dist.send(torch.tensor(blocks), 1, tag=tag)  # untimed: the receiver's block ids
            dist.recv(torch.zeros(1), 1, tag=tag)  # the receiver is ready
            t0 = time.monotonic()
            if mode == "layerwise":
                worker.runner.on_layer = sender.layer_done
                sender.begin(blocks)
                worker.execute(plan)
                t_step = time.monotonic()
                sender.end(TIMEOUT)
                worker.runner.on_layer = None
                sent = list(range(tag, tag + layers))
            else:
                worker.execute(plan)
                t_step = time.monotonic()
                p2p.post_send(tag, cache.read_blocks(blocks), 1)
                sent = [tag]
            t_sent = time.monotonic()
            done = torch.zeros(1, dtype=torch.float64)
            dist.recv(done, 1, tag=tag + layers)
            for t in sent:
                p2p.finish_send(t)
            got = torch.empty((rows * layers, nb, width), dtype=cache.dtype)
            dist.recv(got, 1, tag=tag + layers + 1)
            equal = torch.equal(got, cache.read_blocks(blocks))
            results.append({
                "tokens": n, "mode": mode, "equal": equal,
                "total_ms": (done.item() - t0) * 1e3, "step_ms": (t_step - t0) * 1e3,
                "sender_after_step_ms": (t_sent - t_step) * 1e3,
                "tail_after_step_ms": (done.item() - t_step) * 1e3,
            })  # fmt: skip
        else:
            ids = torch.zeros(nb, dtype=torch.long)
            dist.recv(ids, 0, tag=tag)
            dist.send(torch.zeros(1), 0, tag=tag)
            if mode == "layerwise":
                for i in range(layers):
                    data = p2p.recv((rows, nb, width), 0, tag + i)
                    write_layer(cache, i, ids, data)
            else:
                worker.recv_blocks(ids.tolist(), 0, tag, nb)
            dist.send(torch.tensor([time.monotonic()], dtype=torch.float64), 0, tag=tag + layers)
            dist.send(cache.read_blocks(ids.tolist()), 0, tag=tag + layers + 1)
        tag += layers + 2
    if rank == 0:
        out.put(results)
    worker.leave_group()


def summary(xs: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(xs), "min_ms": min(xs), "max_ms": max(xs)}


def main(args: argparse.Namespace) -> dict[str, Any]:
    import torch.distributed as dist

    store = dist.TCPStore(
        "127.0.0.1", 0, 2, is_master=True, timeout=datetime.timedelta(seconds=TIMEOUT),
        wait_for_workers=False,
    )  # fmt: skip
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=run_rank, args=(r, store.port, args, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    trials = out.get(timeout=3600)
    for p in procs:
        p.join(60)
    keys = ("total_ms", "step_ms", "tail_after_step_ms", "sender_after_step_ms")
    cases = report_cases(trials, args.lengths, keys)
    return {
        "benchmark": "layerwise_transfer", "transport": "gloo", "model": "smollm2-135m",
        "dtype": "bfloat16", "cores": args.cores, "rounds": args.rounds,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
        "cpu": _cpu(), "loadavg_start": args.load0, "loadavg_end": os.getloadavg(),
        "cases": cases, "trials": trials,
    }  # fmt: skip


def report_cases(
    trials: list[dict[str, Any]], lengths: list[int], keys: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Per prompt length: each mode's `keys` summarized over its trials and the saving of
    layer by layer over after the forward; printed. Exits if any trial's KV differed."""
    if not all(t["equal"] for t in trials):
        raise SystemExit("received KV differs from the sender's")
    cases = []
    for n in lengths:
        case: dict[str, Any] = {"tokens": n}
        for m in MODES:
            mine = [t for t in trials if t["tokens"] == n and t["mode"] == m]
            case[m] = {k: summary([t[k] for t in mine]) for k in keys}
        a, lw = case["after"]["total_ms"]["median_ms"], case["layerwise"]["total_ms"]["median_ms"]
        case["saving_ms"], case["saving_pct"] = a - lw, 100 * (a - lw) / a
        cases.append(case)
        print(f"{n:5d} tokens  total after {a:7.1f} ms  layerwise {lw:7.1f} ms  "
              f"saving {a - lw:+6.1f} ms ({case['saving_pct']:+.1f}%)")  # fmt: skip
        for m in MODES:
            c = case[m]
            print(f"      {m:9s} step {_fmt(c['step_ms'])}  tail after the step "
                  f"{_fmt(c['tail_after_step_ms'])}  total {_fmt(c['total_ms'])}")  # fmt: skip
    return cases


def _fmt(s: dict[str, float]) -> str:
    return f"{s['median_ms']:7.1f} [{s['min_ms']:.1f}-{s['max_ms']:.1f}]"


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cores", type=int, nargs=2, default=[0, 1], help="prefill, receiver")
    ap.add_argument("--output", default="benchmarks/results/layerwise_transfer.json")
    a = ap.parse_args()
    a.load0 = os.getloadavg()
    res = main(a)
    with open(a.output, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", a.output)
