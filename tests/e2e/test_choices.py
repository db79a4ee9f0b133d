"""Several choices per prompt (`n` up to 8) through the real server (Ray actors, SmolLM2 in
float32), disaggregated and colocated: each choice has its own index and finish reason,
usage counts the prompt once, greedy choices are equal, seeded ones differ from each other
and repeat, streams carry every choice, the later choices take the prompt's blocks from
the prefix cache, and dropped clients leave no KV block behind."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import httpx
import openai
import pytest

from distserve.bench.server_process import running_server
from distserve.cluster.controller import Controller
from distserve.config import EmulationConfig, EngineConfig, PlacementConfig
from distserve.core import SamplingParams
from tests.e2e.test_server import _all_samples, _metric, _samples

pytestmark = pytest.mark.slow  # starts a real server (Ray actors, the real model)

MODEL = "smollm2-135m"
PLACEMENTS = {  # (1P1D's paths are 2P1D's with one prefill instance fewer)
    # the later choices must follow the first to the prefill instance holding its blocks
    "2P1D": ["--mode", "disagg", "--prefill-instances", "2", "--dtype", "float32"],
    "colocated": ["--mode", "colocated", "--instances", "1", "--dtype", "float32"],
}
STORY = (
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "woodcutter and his three daughters. Every morning he walked into the woods with his axe. "
)


@pytest.fixture(scope="module", params=list(PLACEMENTS))
def server(request: pytest.FixtureRequest):
    with running_server(*PLACEMENTS[request.param]) as url:
        yield request.param, url


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_greedy_choices_are_equal_and_the_prompt_is_counted_once(server) -> None:
    placement, url = server
    client = _client(url)
    kw = {"model": MODEL, "max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}
    one = client.completions.create(prompt="The capital of France is", **kw)
    many = client.completions.create(prompt="The capital of France is", n=8, **kw)
    assert [c.index for c in many.choices] == list(range(8))
    assert {c.text for c in many.choices} == {one.choices[0].text}
    assert all(c.finish_reason == "length" for c in many.choices)
    assert many.usage.prompt_tokens == one.usage.prompt_tokens
    assert many.usage.completion_tokens == 8 * 12
    assert many.usage.total_tokens == many.usage.prompt_tokens + 8 * 12
    other = client.completions.create(prompt="def fibonacci(n):", **kw)
    both = client.completions.create(
        prompt=["The capital of France is", "def fibonacci(n):"], n=2, **kw
    )
    texts = [one.choices[0].text] * 2 + [other.choices[0].text] * 2
    assert [(c.index, c.text) for c in both.choices] == list(enumerate(texts))  # prompt by prompt
    assert both.usage.prompt_tokens == one.usage.prompt_tokens + other.usage.prompt_tokens


def test_seeded_choices_differ_repeat_and_finish_on_their_own(server) -> None:
    client = _client(server[1])
    kw = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write one short sentence about the sea."}],
        "n": 6,
        "max_tokens": 20,
        "temperature": 1.0,
        "seed": 11,
        "stop": ["."],
        "logprobs": True,
    }
    first = client.chat.completions.create(**kw)
    again = client.chat.completions.create(**kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == list(range(6))
    assert len(set(texts)) == 6, texts
    assert [c.message.content for c in again.choices] == texts
    counts = [len(c.logprobs.content) for c in first.choices]
    for c, n in zip(first.choices, counts, strict=True):  # each choice's own reason
        assert c.finish_reason in ("stop", "length") and n <= 20
        assert (c.finish_reason == "length") == (n == 20 and not c.message.content.endswith("."))
    assert first.usage.completion_tokens == sum(counts)
    other = client.chat.completions.create(**{**kw, "seed": 12})
    assert [c.message.content for c in other.choices] != texts


def test_streamed_choices_match_the_whole_answers(server) -> None:
    client = _client(server[1])
    kw = {"model": MODEL, "n": 3, "max_tokens": 10, "temperature": 0.9, "seed": 4}
    whole = client.completions.create(prompt="Once upon a time", **kw)
    pieces: dict[int, list[str]] = {i: [] for i in range(3)}
    reasons: dict[int, list[str]] = {i: [] for i in range(3)}
    usage = None
    for chunk in client.completions.create(
        prompt="Once upon a time", stream=True, stream_options={"include_usage": True}, **kw
    ):
        usage = chunk.usage or usage
        for c in chunk.choices:
            pieces[c.index].append(c.text)
            if c.finish_reason:
                reasons[c.index].append(c.finish_reason)
    assert ["".join(pieces[i]) for i in range(3)] == [c.text for c in whole.choices]
    assert [reasons[i] for i in range(3)] == [[c.finish_reason] for c in whole.choices]
    assert usage is not None and usage.model_dump() == whole.usage.model_dump()

    messages = [{"role": "user", "content": "Say hi"}]
    chat_whole = client.chat.completions.create(messages=messages, **kw)
    roles: dict[int, int] = {}
    deltas: dict[int, list[str]] = {i: [] for i in range(3)}
    for chunk in client.chat.completions.create(messages=messages, stream=True, **kw):
        for c in chunk.choices:
            if c.delta.role:
                roles[c.index] = roles.get(c.index, 0) + 1
            deltas[c.index].append(c.delta.content or "")
    assert roles == {0: 1, 1: 1, 2: 1}
    assert ["".join(deltas[i]) for i in range(3)] == [c.message.content for c in chat_whole.choices]


def test_later_choices_take_the_prompts_blocks_from_the_prefix_cache(server) -> None:
    _, url = server
    prompt = STORY + "What did he carry?"  # a prompt no other test sends: choice 0 misses
    with httpx.Client(base_url=url, timeout=120) as http:

        def hits() -> float:  # on the instances that take prompts
            text = http.get("/metrics").text
            found = _all_samples(text, "distserve_prefix_cache_hit_tokens_total")
            return sum(v for labels, v in found if "decode" not in labels)

        before = hits()
        r = http.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": prompt, "n": 8, "max_tokens": 4, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        after = hits()
    n = body["usage"]["prompt_tokens"]
    assert n > 32
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # choice 0 computed it
    # the 7 later choices each took every full block of the prompt from the cache
    assert after - before == 7 * 16 * ((n - 1) // 16)


async def _outputs(controller: Controller, state: object) -> list[object]:
    return [o async for o in controller.stream(state)]  # type: ignore[arg-type]


def test_choices_waiting_for_the_first_end_with_it_and_hold_no_block() -> None:
    """The real controller on emulated devices (no math, no Ray): the later choices wait
    for the first one's prefill; aborted before it, they end without ever being queued;
    run to the end, each takes the prompt's full blocks from the prefill side's cache."""
    prompt = list(range(100, 300))  # 200 tokens: 12 full blocks and a partial one
    params = SamplingParams(max_tokens=30, ignore_eos=True, temperature=0)

    async def run() -> None:
        placement = dataclasses.replace(PlacementConfig(mode="disagg"), emulated=True)
        controller = Controller(
            EngineConfig(model="opt-13b"), placement, emulation=EmulationConfig()
        )
        await controller.start()
        try:
            states = controller.submit_all([(prompt, params)], n=8)
            assert len(controller.held) == 7 and len(controller.table.requests) == 1
            for s in states:
                controller.abort(s.request_id)
            assert len(controller.held) == 0 and not controller.table.requests
            assert [await _outputs(controller, s) for s in states] == [[]] * 8
            states = controller.submit_all([(prompt, params)], n=8)
            finals = [(await _outputs(controller, s))[-1] for s in states]
            assert all(o.finished and len(o.token_ids) == 30 for o in finals)
            assert [o.num_cached_tokens for o in finals] == [0] + [192] * 7
            for inst in controller.instances:
                inst.scheduler.blocks.check_integrity()
                assert inst.scheduler.blocks.num_used_blocks == 0, inst.name
                assert not inst.scheduler.has_unfinished(), inst.name
        finally:
            await controller.stop()

    asyncio.run(run())


def test_dropped_clients_abort_every_choice_and_free_every_block(server) -> None:
    _, url = server
    body = {"model": MODEL, "max_tokens": 400, "ignore_eos": True, "n": 8}
    with httpx.Client(base_url=url, timeout=120) as http:
        aborted = _metric(http.get("/metrics").text, 'distserve_requests_total{outcome="abort"}')
        with http.stream(
            "POST", "/v1/completions", json={**body, "prompt": "Story: once", "stream": True}
        ) as r:
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data: ")
                if got >= 12:  # several choices under way
                    break
        with pytest.raises(httpx.ReadTimeout):  # a whole answer the client stops waiting for
            http.post(
                "/v1/chat/completions",
                json={**body, "messages": [{"role": "user", "content": "Tell a story"}]},
                timeout=3,
            )
        deadline = time.monotonic() + 60
        while True:
            text = http.get("/metrics").text
            used = _samples(text, "distserve_kv_blocks", state="used")
            queued = [v for _, v in _all_samples(text, "distserve_queue_length")]
            if used and all(v == 0 for v in used) and all(v == 0 for v in queued):
                break
            assert time.monotonic() < deadline, f"blocks still used: {used}, queues {queued}"
            time.sleep(0.5)
        gone = _metric(text, 'distserve_requests_total{outcome="abort"}') - aborted
        assert gone == 16  # every choice of both requests, none twice
        assert http.get("/health").status_code == 200
