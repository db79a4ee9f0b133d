"""Prefix caching through the real server (1P1D, Ray actors, SmolLM2 in float32): a
repeated prompt reports cached prompt tokens in its usage (streamed usage too) and gives
the same greedy output; the decode side already holds the migrated prefix, so the second
migration moves fewer bytes; /metrics counts the hits."""

from __future__ import annotations

import httpx
import openai
import pytest

from distserve.bench.server_process import running_server
from tests.e2e.test_server import _metric, _samples

pytestmark = pytest.mark.slow  # starts a real server (Ray actors, the real model)

MODEL = "smollm2-135m"
STORY = (
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "woodcutter and his three daughters. Every morning he walked into the woods with his "
    "axe, and every evening he came back with a bundle of firewood on his back. "
) * 2


@pytest.fixture(scope="module")
def url():
    with running_server("--mode", "disagg", "--dtype", "float32") as url:
        yield url


def _migrated_bytes(http: httpx.Client) -> float:
    return _metric(http.get("/metrics").text, "distserve_migration_bytes_total")


def test_a_repeated_prompt_is_served_from_the_cache_with_the_same_output(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    prompt = STORY + "What did the woodcutter carry home in the evening?"
    with httpx.Client(base_url=url, timeout=60) as http:
        outs, moved = [], []
        for _ in range(2):
            before = _migrated_bytes(http)
            outs.append(
                client.completions.create(
                    model=MODEL,
                    prompt=prompt,
                    max_tokens=16,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )
            )
            moved.append(_migrated_bytes(http) - before)
        metrics = http.get("/metrics").text
    first, second = outs
    n = first.usage.prompt_tokens
    assert n > 64
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 16 * ((n - 1) // 16)
    assert second.choices[0].text == first.choices[0].text
    # the decode side registered the first request's migrated blocks: only the tail moves
    assert moved[0] > 0 and moved[1] < moved[0] / 4
    hits = _samples(metrics, "distserve_prefix_cache_hit_tokens_total", instance="prefill-0")
    total = _samples(metrics, "distserve_prefix_cache_prompt_tokens_total", instance="prefill-0")
    rate = _samples(metrics, "distserve_prefix_cache_hit_rate", instance="prefill-0")
    assert hits and total and rate
    assert hits[0] >= second.usage.prompt_tokens_details.cached_tokens
    assert rate[0] == pytest.approx(hits[0] / total[0]) and 0 < rate[0] < 1
    assert _samples(metrics, "distserve_kv_blocks", instance="prefill-0", state="cached")[0] > 0


def test_streamed_chat_usage_reports_cached_tokens(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [
        {"role": "system", "content": STORY},
        {"role": "user", "content": "How many daughters did the woodcutter have?"},
    ]
    texts, usages = [], []
    for _ in range(2):
        stream = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
        texts.append("".join(pieces))
        usages.append(usage)
    assert usages[0] is not None and usages[1] is not None
    n = usages[1].prompt_tokens
    assert usages[1].prompt_tokens_details.cached_tokens == 16 * ((n - 1) // 16)
    assert texts[1] == texts[0] and texts[0]
