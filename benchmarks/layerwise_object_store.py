"""Layer-wise KV transfer against the transfer after the forward, through Ray's object
store between two Ray actors (runtime/worker/layerwise.py); the gloo variant is
benchmarks/layerwise_transfer.py.

    python benchmarks/layerwise_object_store.py [--rounds 5] [--lengths 512 1024 2048]
        [--output benchmarks/results/layerwise_object_store.json]

Two Ray actors, each a Worker pinned to one core as `serve` runs them: a prefill worker
(SmolLM2, bf16, its real weights) and a decode-side worker. For a prompt of N tokens:

  after      the prefill step, then what `serve --transport object-store` migration does:
             the driver asks the decode side to write the blocks that the prefill side's
             `read_blocks` returns, an object the decode side pulls from the store
  layerwise  the prefill step with `ModelRunner.on_layer` set: a background thread of the
             prefill actor gathers each layer's rows as the layer finishes, puts them in
             the object store and calls the decode actor to write them (one call a layer)

Timed: from the step's start to the decode side's last write (CLOCK_MONOTONIC, shared by
the two processes), and the prefill step itself; a first trial of each variant warms Ray
up and is not counted. Rounds alternate the variants, order
reversed every round. Every trial checks the received KV equals the sender's, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layerwise_transfer import MODES, _cpu, report_cases, schedule  # noqa: E402

TIMEOUT = 120.0


def _numpy(t: torch.Tensor) -> np.ndarray[Any, Any]:
    t = t.contiguous()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


class Side:
    """One end: a Worker on one core (the prefill side with real weights)."""

    def __init__(self, core: int, real: bool, num_blocks: int) -> None:
        from distserve.config import EngineConfig
        from distserve.core import CacheConfig
        from distserve.runtime.worker.worker import Worker

        config = EngineConfig(
            dtype="bfloat16", load_format="auto" if real else "random",
            cache=CacheConfig(num_blocks=num_blocks),
        )  # fmt: skip
        self.worker = Worker(config, [core])
        self.num_blocks = num_blocks
        self.last_write = 0.0

    # ---- the decode side ---------------------------------------------------------
    def write_blocks(self, ids: list[int], data: np.ndarray[Any, Any]) -> float:
        self.worker.write_blocks(ids, data)
        self.last_write = time.monotonic()
        return self.last_write

    def write_layer(self, layer: int, ids: list[int], data: np.ndarray[Any, Any]) -> None:
        from distserve.runtime.worker.layerwise import write_layer

        t = torch.from_numpy(np.ascontiguousarray(data)).view(torch.bfloat16)
        write_layer(self.worker.cache, layer, torch.tensor(ids), t)
        self.last_write = time.monotonic()

    def last(self) -> float:
        return self.last_write

    def read_blocks(self, ids: list[int]) -> np.ndarray[Any, Any]:
        return self.worker.read_blocks(ids)

    # ---- the prefill side --------------------------------------------------------
    def prefill(self, n: int, mode: str, peer: Any, peer_ids: list[int]) -> dict[str, Any]:
        """One prefill of n tokens; with mode 'layerwise', each layer sent as it ends.
        Returns its times and its block ids."""
        import ray

        from distserve.runtime.worker.layerwise import LayerwiseSender
        from distserve.runtime.worker.synthetic import SyntheticPlans

        w = self.worker
        if not hasattr(self, "plans"):
            self.plans = SyntheticPlans(
                self.num_blocks, w.cache.block_size, w.info().model_config.vocab_size
            )
        self.plans.release()
        plan = self.plans.prefill(n, 1)
        blocks = list(plan.chunks[0].block_table)
        calls: list[Any] = []
        if mode == "layerwise":
            sender = LayerwiseSender(
                w.cache,
                lambda i, t: calls.append(peer.write_layer.remote(i, peer_ids, ray.put(_numpy(t)))),
            )
            w.runner.on_layer = sender.layer_done
            t0 = time.monotonic()
            sender.begin(blocks)
            w.execute(plan)
            t_step = time.monotonic()
            sender.end(TIMEOUT)
            w.runner.on_layer = None
        else:
            t0 = time.monotonic()
            w.execute(plan)
            t_step = time.monotonic()
        ray.get(calls, timeout=TIMEOUT)
        return {"t0": t0, "t_step": t_step, "blocks": blocks}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        num_blocks = max(args.lengths) // 16 + 8
        actor = ray.remote(num_cpus=1)(Side)
        pre = actor.remote(args.cores[0], True, num_blocks)
        dec = actor.remote(args.cores[1], False, num_blocks)
        trials = []
        warm = [(min(args.lengths), m) for m in MODES]  # first Ray calls and puts: not timed
        for k, (n, mode) in enumerate(warm + schedule(args.lengths, args.rounds)):
            nb = -(-n // 16)
            ids = list(range(nb))  # the decode side's blocks: its cache is all ours
            step = ray.get(pre.prefill.remote(n, mode, dec, ids), timeout=TIMEOUT)
            if mode == "after":  # as migration does: the decode side pulls the object
                done = ray.get(
                    dec.write_blocks.remote(ids, pre.read_blocks.remote(step["blocks"])),
                    timeout=TIMEOUT,
                )
            else:
                done = ray.get(dec.last.remote(), timeout=TIMEOUT)
            sent = ray.get(pre.read_blocks.remote(step["blocks"]), timeout=TIMEOUT)
            got = ray.get(dec.read_blocks.remote(ids), timeout=TIMEOUT)
            if k < len(warm):
                continue
            trials.append({
                "tokens": n, "mode": mode, "equal": bool(np.array_equal(sent, got)),
                "total_ms": (done - step["t0"]) * 1e3,
                "step_ms": (step["t_step"] - step["t0"]) * 1e3,
                "tail_after_step_ms": (done - step["t_step"]) * 1e3,
            })  # fmt: skip
            print(f"  {n:5d} {mode:9s} total {trials[-1]['total_ms']:7.1f} ms", flush=True)
        return trials
    finally:
        ray.shutdown()


def main(args: argparse.Namespace) -> dict[str, Any]:
    trials = run(args)
    cases = report_cases(trials, args.lengths, ("total_ms", "step_ms", "tail_after_step_ms"))
    return {
        "benchmark": "layerwise_object_store", "transport": "object-store",
        "model": "smollm2-135m", "dtype": "bfloat16", "cores": args.cores,
        "rounds": args.rounds, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": platform.node(), "cpu": _cpu(), "loadavg_start": args.load0,
        "loadavg_end": os.getloadavg(), "cases": cases, "trials": trials,
    }  # fmt: skip


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048],
                    help="prompt lengths in tokens")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=5, help="rounds of every (length, mode)")
    ap.add_argument("--cores", type=int, nargs=2, default=[0, 1], help="prefill, receiver")
    ap.add_argument("--output", default="benchmarks/results/layerwise_object_store.json",
                    help="results JSON")  # fmt: skip
    a = ap.parse_args()
    a.load0 = os.getloadavg()
    res = main(a)
    with open(a.output, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", a.output)
