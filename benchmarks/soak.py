"""Soak: thousands of streaming requests against a real server (1P1D, Ray actors), a share
of clients hanging up mid-stream; then count what was lost and what leaked.

    python benchmarks/soak.py [--requests 2000] [--disconnect 0.2] [--concurrency 32]
    python benchmarks/soak.py --requests 600 --kill decode --output .../soak-kill-decode.json

With --kill ROLE, that role's worker process is SIGKILLed once a third of the requests
are done; the report adds how long until /health shows the instance back (restarted).

Lost: a request that neither completed with all its tokens nor was dropped by its own
client. Leaked: KV blocks still used, or requests still queued, once all clients are done.
RSS: resident memory of the server and its worker processes, before and after.
Writes benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable

import httpx
import psutil

from distserve.bench.server_process import running_server

MODEL = "smollm2-135m"


def tree_rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker that ended meanwhile
            total += psutil.Process(pid).memory_info().rss
    return total


def server_pids(url: str) -> list[int]:
    health = httpx.get(url + "/health", timeout=10).json()
    workers = [v["pid"] for v in health["instances"].values() if v["pid"]]
    servers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"]
        and "serve" in p.info["cmdline"]
        and "distserve.cli" in " ".join(p.info["cmdline"])
    ]
    return servers + workers


async def one(client: httpx.AsyncClient, i: int, rng: random.Random, disconnect: float) -> str:
    n = rng.randint(4, 32)
    prompt = [rng.randrange(1000, 30000) for _ in range(rng.randint(16, 128))]
    hang_up = rng.random() < disconnect
    cut = rng.randint(1, n)
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": n,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    got, tokens = 0, 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return f"http {r.status_code}"
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return "error"
                got += len(chunk.get("choices", []))
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if hang_up and got >= cut:
                    return "disconnected"  # leaving the block closes the connection
    except httpx.HTTPError as e:
        return f"transport {type(e).__name__}"
    return "ok" if tokens == n else f"short {tokens}/{n}"


async def kill_once(
    url: str, role: str, when: Callable[[], bool], report: dict[str, float | int]
) -> None:
    """SIGKILL `role`'s first worker once `when()` holds; time until /health is ok again
    with a new process in its place."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while not when():
            await asyncio.sleep(0.2)
        instances = (await client.get("/health")).json()["instances"]
        name, pid = next((k, v["pid"]) for k, v in instances.items() if v["role"] == role)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        report |= {"killed_pid": pid}
        while True:
            await asyncio.sleep(0.2)
            r = await client.get("/health")
            now = r.json()["instances"].get(name, {})
            if r.status_code == 200 and now.get("pid") not in (None, pid):
                report |= {"restarted_after_s": time.monotonic() - t0, "new_pid": now["pid"]}
                print(f"{name} killed; healthy again after {report['restarted_after_s']:.1f} s")
                return


async def soak(
    url: str,
    requests: int,
    concurrency: int,
    disconnect: float,
    seed: int,
    pids: list[int],
    rss_timeline: list[tuple[int, float]],
    kill: str | None = None,
    kill_report: dict[str, float | int] | None = None,
) -> dict:
    """Send the requests; every 250 finished, print the outcomes and sample the RSS (MB)."""
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)
    outcomes: dict[str, int] = {}
    killer = None
    if kill:
        third = lambda: sum(outcomes.values()) >= requests // 3  # noqa: E731
        assert kill_report is not None
        killer = asyncio.create_task(kill_once(url, kill, third, kill_report))
    async with httpx.AsyncClient(
        base_url=url, timeout=300, limits=httpx.Limits(max_connections=None)
    ) as client:

        async def guarded(i: int) -> None:
            async with sem:
                o = await one(client, i, rng, disconnect)
            outcomes[o] = outcomes.get(o, 0) + 1
            done = sum(outcomes.values())
            if done % 250 == 0:
                rss_timeline.append((done, tree_rss(pids) / 2**20))
                print(f"{done}/{requests} {outcomes} rss {rss_timeline[-1][1]:.0f} MB", flush=True)

        await asyncio.gather(*(guarded(i) for i in range(requests)))
    if killer is not None:
        await asyncio.wait_for(killer, 300)
    return outcomes


def leaks(url: str, timeout: float = 60) -> tuple[float, float]:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(url + "/metrics", timeout=10).text
        used = sum(
            float(ln.rsplit(" ", 1)[1])
            for ln in text.splitlines()
            if ln.startswith("distserve_kv_blocks{") and 'state="used"' in ln
        )
        queued = sum(
            float(ln.rsplit(" ", 1)[1])
            for ln in text.splitlines()
            if ln.startswith("distserve_queue_length{")
        )
        if (used == 0 and queued == 0) or time.monotonic() > deadline:
            return used, queued
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=2000, help="requests to send (default: 2000)")
    ap.add_argument(
        "--concurrency", type=int, default=32, help="requests in flight at once (default: 32)"
    )
    ap.add_argument(
        "--disconnect",
        type=float,
        default=0.2,
        help="share of clients that hang up mid-stream (default: 0.2)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    ap.add_argument(
        "--kill",
        choices=["prefill", "decode"],
        default=None,
        help="SIGKILL this role's worker once a third of the requests are done",
    )
    ap.add_argument("--output", default="benchmarks/results/soak.json", help="results JSON")
    args = ap.parse_args()
    with running_server("--mode", "disagg", kv_cache_gb=0.3) as url:
        pids = server_pids(url)
        rss0 = tree_rss(pids)
        t0 = time.monotonic()
        timeline: list[tuple[int, float]] = []
        killed: dict[str, float | int] = {}
        outcomes = asyncio.run(
            soak(
                url,
                args.requests,
                args.concurrency,
                args.disconnect,
                args.seed,
                pids,
                timeline,
                args.kill,
                killed,
            )
        )
        pids = server_pids(url)  # a killed worker has a successor
        seconds = time.monotonic() - t0
        used, queued = leaks(url)
        rss1 = tree_rss(pids)
    lost = sum(v for k, v in outcomes.items() if k not in ("ok", "disconnected"))
    report = {
        "requests": args.requests, "outcomes": outcomes, "lost": lost,
        "leaked_blocks": used, "queued_after": queued, "seconds": seconds,
        "rss_before_mb": rss0 / 2**20, "rss_after_mb": rss1 / 2**20,
        "rss_growth_mb": (rss1 - rss0) / 2**20,
        "rss_timeline_mb": timeline,
        "kill": killed or None,
        "config": vars(args),
    }  # fmt: skip
    print(json.dumps(report, indent=1))
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=1)
    return 0 if lost == 0 and used == 0 and queued == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
