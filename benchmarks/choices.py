"""Several choices per prompt (`n`): what sharing the prompt's KV saves.

    python benchmarks/choices.py [--n 8] [--repeats 3] [--prompt-copies 20]

Serves SmolLM2 1P1D twice, with prefix caching (the later choices wait for the first's
prefill and take its full blocks from the cache) and with `--no-prefix-caching` (every
choice computes the whole prompt), and sends the same long prompt with `n` choices,
`repeats` times (a fresh prompt each time, so the first choice always misses). Prints,
per request: wall time, prompt tokens computed out of n x prompt, when the first and the
last choice got their first token, and the KV bytes migrated to the decode instance.
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx

from distserve.bench.server_process import running_server

STORY = (
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "woodcutter and his three daughters. Every morning he walked into the woods with his axe. "
)


def _sum(text: str, name: str, skip: str = "decode") -> float:
    """Sum of a metric's samples over the instances whose labels do not contain `skip`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            labels, value = line[len(name) :].rsplit(" ", 1)
            if skip not in labels:
                total += float(value)
    return total


def measure(flags: list[str], label: str, args: argparse.Namespace) -> None:
    with (
        running_server("--mode", "disagg", *flags) as url,
        httpx.Client(base_url=url, timeout=600) as http,
    ):
        walls = []
        for rep in range(args.repeats):
            prompt = f"[{rep}] " + STORY * args.prompt_copies + "What did he carry?"
            before = http.get("/metrics").text
            t0 = time.perf_counter()
            r = http.post(
                "/v1/completions",
                json={
                    "model": "smollm2-135m", "prompt": prompt, "n": args.n, "max_tokens": 16,
                    "temperature": 0.8, "seed": 1, "ignore_eos": True,
                },
            )  # fmt: skip
            wall = time.perf_counter() - t0
            r.raise_for_status()
            body = r.json()
            after = http.get("/metrics").text
            hit = "distserve_prefix_cache_hit_tokens_total"
            moved = "distserve_migration_bytes_total"
            hits = _sum(after, hit) - _sum(before, hit)
            mib = (_sum(after, moved, skip="\0") - _sum(before, moved, skip="\0")) / 2**20
            p = body["usage"]["prompt_tokens"]
            firsts = sorted(c["metrics"]["prefill_end"] for c in body["choices"])
            walls.append(wall)
            print(
                f"{label}: wall {wall:.2f} s; prompt {p} tokens, computed "
                f"{args.n * p - hits:.0f} of {args.n * p}; first token of the first choice "
                f"at {firsts[0]:.2f} s, of the last at {firsts[-1]:.2f} s; migrated {mib:.1f} MiB"
            )
        print(f"{label}: median wall {statistics.median(walls):.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8, help="choices per request (1-8)")
    ap.add_argument("--repeats", type=int, default=3, help="requests per server")
    ap.add_argument(
        "--prompt-copies", type=int, default=20, help="copies of a 40-token story in the prompt"
    )
    args = ap.parse_args()
    measure([], "shared (prefix caching)", args)
    measure(["--no-prefix-caching"], "unshared (--no-prefix-caching)", args)


if __name__ == "__main__":
    main()
