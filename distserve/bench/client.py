"""The load client: replays a workload against an OpenAI-compatible server, streaming.
Independent requests go open loop (each is sent at its arrival time whatever happened
before); the turns of a multi-turn session closed loop (a turn is sent when the one
before it has finished, plus its think time)."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from typing import Any

import aiohttp
import httpx

from distserve.metrics.results import RequestResult
from distserve.workload import Workload, WorkloadRequest


async def server_model(base_url: str, api_key: str | None = None) -> str:
    """The id of the first model the server lists."""
    async with httpx.AsyncClient(
        base_url=base_url, headers=_headers(api_key), timeout=30
    ) as client:
        r = await client.get("/v1/models")
        r.raise_for_status()
        return str(r.json()["data"][0]["id"])


def layout_name(health: dict[str, Any]) -> str | None:
    """A server's layout in the paper's words, from its /health body: `1P1D` (prefill and
    decode instances), `colocated x2`; None if the body lists no instances."""
    roles = collections.Counter(
        str(i.get("role")) for i in (health.get("instances") or {}).values()
    )
    if not roles:
        return None
    parts = []
    if roles["prefill"] or roles["decode"]:
        parts.append(f"{roles['prefill']}P{roles['decode']}D")
    if roles["colocated"]:
        parts.append(f"colocated x{roles['colocated']}")
    return " + ".join(parts) or None


async def server_layout(base_url: str, api_key: str | None = None) -> str:
    """The layout the server at `base_url` runs (its /health), or, for a server that does
    not say (another engine, an error), its address."""
    try:
        async with httpx.AsyncClient(
            base_url=base_url, headers=_headers(api_key), timeout=30
        ) as client:
            r = await client.get("/health")
            name = layout_name(r.json())
    except (httpx.HTTPError, ValueError, AttributeError):
        name = None
    return name or base_url.removeprefix("http://").removeprefix("https://")


async def run_workload(
    base_url: str,
    workload: Workload,
    model: str,
    api_key: str | None = None,
    request_timeout: float = 600.0,
    progress: bool = True,
    extra_body: dict[str, Any] | None = None,
    desc: str = "requests",
) -> tuple[list[RequestResult], float]:
    """Send every request at its arrival time (a later turn of a session: its think time
    after the previous turn finished); return results in workload order and the
    wall-clock seconds from the first send to the last completion. `desc` names the
    progress bar."""
    from tqdm import tqdm

    # aiohttp, not httpx: its C parser makes a streamed chunk ~5x cheaper, so the client's
    # own lateness stays out of the TTFT and TPOT it measures under load
    timeout = aiohttp.ClientTimeout(total=request_timeout, connect=30.0)
    async with aiohttp.ClientSession(
        base_url=base_url,
        headers=_headers(api_key),
        timeout=timeout,
        connector=aiohttp.TCPConnector(limit=0),
    ) as client:
        bar = tqdm(total=len(workload), desc=desc, unit="req", disable=not progress)
        start = time.perf_counter()

        async def one(req: WorkloadRequest) -> RequestResult:
            delay = start + req.arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            result = await _send(client, req, model, start, extra_body or {})
            bar.update(1)
            return result

        async def session(turns: list[WorkloadRequest]) -> list[RequestResult]:
            out, due = [], start + turns[0].arrival
            for req in turns:
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                res = await _send(client, req, model, start, extra_body or {})
                res.arrival = due - start  # when it became due, not the nominal time
                out.append(res)
                bar.update(1)
                due = time.perf_counter()  # this answer has finished: the next turn waits
                if req is not turns[-1]:
                    due += turns[len(out)].think_time
            return out

        singles = [r for r in workload.requests if r.session is None]
        sessions: dict[int, list[WorkloadRequest]] = {}
        for r in workload.requests:
            if r.session is not None:
                sessions.setdefault(r.session, []).append(r)
        done = await asyncio.gather(
            asyncio.gather(*(one(r) for r in singles)),
            asyncio.gather(*(session(sorted(t, key=lambda r: r.turn)) for t in sessions.values())),
        )
        elapsed = time.perf_counter() - start
        bar.close()
    by_index = {r.index: r for r in done[0]}
    by_index |= {r.index: r for turns in done[1] for r in turns}
    return [by_index[r.index] for r in workload.requests], elapsed


async def _send(
    client: aiohttp.ClientSession,
    req: WorkloadRequest,
    model: str,
    start: float,
    extra: dict[str, Any],
) -> RequestResult:
    body = {
        "model": model,
        "prompt": list(req.prompt_token_ids),
        "max_tokens": req.output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    } | extra
    res = RequestResult(req.index, req.prompt_len, req.output_len, req.arrival)
    res.session, res.turn = req.session, req.turn
    t0 = time.perf_counter()
    res.sent = t0 - start
    first = last = None
    try:
        async with client.post("/v1/completions", json=body) as r:
            if r.status != 200:
                text = (await r.read()).decode(errors="replace")
                res.error = f"HTTP {r.status}: {text[:300]}"
                return res
            async for raw in r.content:
                if not raw.startswith(b"data: "):
                    continue
                data = raw[6:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message", chunk["error"]))
                    continue
                now = time.perf_counter()
                if chunk.get("usage"):
                    res.num_tokens = int(chunk["usage"]["completion_tokens"])
                    details = chunk["usage"].get("prompt_tokens_details") or {}
                    if details.get("cached_tokens") is not None:
                        res.cached_tokens = int(details["cached_tokens"])
                for choice in chunk.get("choices", []):
                    first = first if first is not None else now
                    last = now
                    if choice.get("finish_reason") and choice.get("metrics"):
                        res.server = {k: float(v) for k, v in choice["metrics"].items()}
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:  # ValueError: bad JSON
        res.error = f"{type(e).__name__}: {e}"
    if first is None:
        res.error = res.error or "no tokens received"
        return res
    assert last is not None
    res.ttft, res.e2e = first - t0, last - t0
    n = res.num_tokens
    res.tpot = (last - first) / (n - 1) if n > 1 else 0.0
    return res


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
