"""The KV store on the real server (serve --kv-store-gb; core/kv_store.py): every step
writes its new KV through to host memory, so a decode worker SIGKILLed in the middle of a
request is replaced and the request resumes from the store: the step trace shows no second
prefill for it, its output equals an undisturbed run, and afterwards no block or store
slot is held."""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest

from distserve.bench.server_process import running_server
from tests.e2e.test_faults import _wait_blocks_free

pytestmark = pytest.mark.slow  # starts a real server (Ray actors, the real model)

PROMPT = "The history of the printing press begins with " * 6


def _stream(url: str, kill_after: int | None = None) -> tuple[str, str]:
    """(text, request id) of one greedy stream; SIGKILL the decode worker after
    `kill_after` tokens."""
    body = {
        "model": "smollm2-135m",
        "prompt": PROMPT,
        "max_tokens": 48,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    text, rid = [], ""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            rid = chunk["id"].removeprefix("cmpl-")
            text += [c["text"] for c in chunk["choices"]]
            if kill_after is not None and len(text) == kill_after:
                instances = httpx.get(url + "/health", timeout=30).json()["instances"]
                os.kill(instances["decode-0"]["pid"], signal.SIGKILL)
    return "".join(text), rid


def _metric(url: str, name: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {
        ln.split(" ")[0]: float(ln.rsplit(" ", 1)[1])
        for ln in text.splitlines()
        if ln.startswith(name)
    }


def test_decode_killed_mid_request_resumes_from_the_store(tmp_path) -> None:
    trace = tmp_path / "steps.jsonl"
    args = ("--mode", "disagg", "--dtype", "float32", "--kv-store-gb", "0.05",
            "--trace-steps", str(trace), "--degrade-after", "120",
            "--no-prefix-caching")  # fmt: skip  # each run prefills the whole prompt
    with running_server(*args, kv_cache_gb=0.2) as url:
        reference, _ = _stream(url)
        text, rid = _stream(url, kill_after=20)
        assert text == reference
        assert _metric(url, "distserve_kv_store_resumes_total") == {
            'distserve_kv_store_resumes_total{model_name="smollm2-135m"}': 1.0
        }
        _wait_blocks_free(url)
        held = _metric(url, "distserve_kv_store_slots")
        assert held['distserve_kv_store_slots{model_name="smollm2-135m",state="held"}'] == 0
        assert held['distserve_kv_store_slots{model_name="smollm2-135m",state="cached"}'] > 0
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    prefills = [s for s in steps if rid in s["prefill_ids"]]
    assert len(prefills) == 1, prefills  # its prompt, once: the resume computed nothing again
    assert any(s["role"] == "decode" and s["decode"] for s in steps)


def test_a_prompt_prefilled_on_one_instance_is_loaded_from_the_store_by_another() -> None:
    """Two colocated instances in this process; the one that computed a prompt drains
    (as for a flip), so the same prompt goes to the other, which reads the prompt's full
    blocks from the store instead of computing them, and answers the same."""
    import asyncio

    from distserve.cluster.controller import Controller
    from distserve.config import CacheConfig, EngineConfig, PlacementConfig
    from distserve.core import SamplingParams
    from distserve.server.metrics import _store_families

    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine = EngineConfig(
        model="smollm2-135m", dtype="float32", cache=CacheConfig(kv_cache_gb=0.05)
    )

    async def run(store_gb: float) -> tuple[list[list[int]], list[int], int]:
        placement = PlacementConfig(mode="colocated", num_instances=2)
        c = Controller(engine, placement, use_ray=False, kv_store_gb=store_gb)
        await c.start()
        try:
            outs, cached = [], []
            for _ in range(2):
                state = c.submit(PROMPT, params)
                out = [o async for o in c.stream(state)][-1]
                outs.append(out.token_ids)
                cached.append(out.num_cached_tokens)
                state.owner.draining = True  # the next one goes to the other instance
            loaded = c.store.directory.stats.blocks_loaded if c.store else 0
            if c.store:
                c.store.directory.check()
                # /metrics exports the count (distserve_kv_store_loaded_blocks_total)
                families = {f.name: f for f in _store_families(c.store.directory)}
                assert families["distserve_kv_store_loaded_blocks"].samples[0].value == loaded
            return outs, cached, loaded
        finally:
            await c.stop()

    outs, cached, loaded = asyncio.run(run(0.02))
    assert outs[0] == outs[1]
    assert cached[0] == 0 and cached[1] == loaded * 16 > 0
    outs_without, cached_without, _ = asyncio.run(run(0.0))
    assert outs_without[1] == outs[1] and cached_without == [0, 0]


def test_a_prefilled_request_outlives_its_prefill_instance_through_the_store() -> None:
    """1P1D in this process: a request's prompt is prefilled, then its prefill instance
    fails (an in-process worker cannot be SIGKILLed: its instance is failed as the health
    watch fails a dead one) before the decode instance, held paused, has pulled the KV.
    The decode instance pulls it from the store instead: the restarted prefill instance
    computes nothing, and the output equals an undisturbed run."""
    import asyncio

    from distserve.cluster.controller import Controller
    from distserve.config import CacheConfig, EngineConfig, PlacementConfig
    from distserve.core import SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine = EngineConfig(
        model="smollm2-135m", dtype="float32", cache=CacheConfig(kv_cache_gb=0.05)
    )

    async def run() -> None:
        c = Controller(engine, PlacementConfig(mode="disagg"), use_ray=False, kv_store_gb=0.02)
        await c.start()
        try:
            reference = [o async for o in c.stream(c.submit(PROMPT, params))][-1].token_ids
            prefill, decode = c.instances
            decode.paused = True
            state = c.submit(PROMPT + " again", params)
            stream = c.stream(state)
            first = await anext(stream)  # prefilled; waiting for the paused decode instance
            prefill.fail(RuntimeError("the prefill worker died"))
            decode.paused = False
            decode.wake()
            rest = [o async for o in stream]
            tokens = rest[-1].token_ids
            assert tokens[: len(first.token_ids)] == first.token_ids
            again = [o async for o in c.stream(c.submit(PROMPT + " again", params))][-1]
            assert tokens == again.token_ids  # the same as computed undisturbed
            assert c.store is not None and c.store.directory.stats.resumes == 1
            for _ in range(100):  # the replacement prefill instance
                if c.instances[0] is not prefill:
                    break
                await asyncio.sleep(0.1)
            assert c.recovery.restarts == 1
            # the replacement prefilled the third request only
            replacement = c.instances[0].scheduler
            assert replacement.num_prompt_tokens_admitted == len(again.prompt_token_ids)
            assert reference  # the first run warmed both instances
        finally:
            await c.stop()

    asyncio.run(run())


def test_a_prefix_pushed_out_of_the_store_to_disk_is_read_back() -> None:
    """serve --kv-store-disk-gb: two colocated instances in this process with a store of a
    few slots. A prompt is computed on one instance, which then drains; a long second
    prompt on the other pushes the first's blocks out of the store's memory to its disk
    tier; the first prompt again, on the other instance, reads them back from disk instead
    of computing them, and answers the same."""
    import asyncio

    from distserve.cluster.controller import Controller
    from distserve.config import CacheConfig, EngineConfig, PlacementConfig
    from distserve.core import SamplingParams
    from distserve.server.metrics import _store_families

    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine = EngineConfig(
        model="smollm2-135m", dtype="float32", cache=CacheConfig(kv_cache_gb=0.05)
    )
    other = "Tides rise and fall twice a day along most of the coast, " * 8

    async def run() -> None:
        placement = PlacementConfig(mode="colocated", num_instances=2)
        c = Controller(engine, placement, use_ray=False, kv_store_gb=0.0055,
                       kv_store_disk=(0.05, None))  # fmt: skip  # 8 slots of 16 fp32 tokens
        await c.start()
        try:
            assert c.store is not None
            directory = c.store.directory
            first = [o async for o in c.stream(c.submit(PROMPT, params))][-1]
            c.instances[0].draining = True  # the rest go to the other instance
            [o async for o in c.stream(c.submit(other, params))]
            assert directory.stats.spilled > 0, directory.stats
            again = [o async for o in c.stream(c.submit(PROMPT, params))][-1]
            assert again.token_ids == first.token_ids
            st = directory.stats
            assert st.blocks_from_disk > 0 and st.blocks_loaded > 0, st
            assert again.num_cached_tokens == st.blocks_loaded * 16
            directory.check()
            families = {f.name: f for f in _store_families(directory)}
            assert families["distserve_kv_store_disk_loaded_blocks"].samples[0].value == (
                st.blocks_from_disk
            )
        finally:
            await c.stop()

    asyncio.run(run())
