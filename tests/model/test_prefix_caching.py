"""Prefix caching on a real model: in float32, greedy outputs of a request whose prompt
hits the cache equal a cold run's token for token (and its log-probabilities agree to
summation order), whether the rest of the prompt is many tokens, one token (run as a
decode-shaped chunk) or chunked; on a tiny random-weight Llama (fast) and on the bundled
SmolLM2 (slow)."""

from __future__ import annotations

import random

import pytest

from distserve.config import EngineConfig
from distserve.core import CacheConfig, SamplingParams, SchedulerConfig
from distserve.runtime.engine import LLMEngine, RequestOutput

LOGPROB_TOL = 1e-4


def run(eng: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
    """Run prompts together to completion; outputs in prompt order."""
    ids = [eng.add_request(p, params) for p in prompts]
    done: dict[str, RequestOutput] = {}
    while eng.has_unfinished():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    return [done[i] for i in ids]


def assert_same(warm: RequestOutput, cold: RequestOutput) -> None:
    assert warm.token_ids == cold.token_ids
    assert warm.logprobs is not None and cold.logprobs is not None
    worst = max(
        abs(a.logprob - b.logprob) for a, b in zip(warm.logprobs, cold.logprobs, strict=True)
    )
    assert worst < LOGPROB_TOL, f"log-prob differs by {worst:.2e}"


def check_hits_equal_cold(
    warm: LLMEngine, cold: LLMEngine, rounds: list[list[list[int]]], hits: list[list[int]]
) -> None:
    """Each round's prompts run together on `warm` (whose cache the earlier rounds
    filled) and one by one on `cold` (no prefix caching); `hits`: the cached prompt
    tokens each warm request must report."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    for prompts, want in zip(rounds, hits, strict=True):
        outs = run(warm, prompts, params)
        assert [o.num_cached_tokens for o in outs] == want
        for p, out in zip(prompts, outs, strict=True):
            (ref,) = run(cold, [p], params)
            assert ref.num_cached_tokens == 0
            assert_same(out, ref)
    assert cold.scheduler.blocks.num_cached_blocks == 0


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.model.hf_reference import tiny_hf_model

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama").save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_tiny_model_greedy_with_prefix_hits_equals_a_cold_run(
    make_engine, tiny_path: str, chunked: bool
) -> None:
    def config(caching: bool) -> EngineConfig:
        return EngineConfig(
            model=tiny_path,
            dtype="float32",
            cache=CacheConfig(num_blocks=64, block_size=16, prefix_caching=caching),
            scheduler=SchedulerConfig(
                max_num_seqs=8,
                max_model_len=256,
                max_num_batched_tokens=24 if chunked else 256,
                chunked_prefill=chunked,
            ),
        )

    warm, cold = make_engine(config(True)), make_engine(config(False))
    rng = random.Random(0)
    a = [rng.randrange(3, 380) for _ in range(70)]
    other = [rng.randrange(3, 380) for _ in range(40)]
    rounds = [
        [a],  # cold: fills the cache
        [a],  # 64 cached, 6 computed
        [a[:64] + other[:1]],  # 64 cached, 1 computed: a decode-shaped chunk
        [a[:40] + other, a[:64] + other[:20]],  # 32 and 64 cached, in one batch
    ]
    check_hits_equal_cold(warm, cold, rounds, [[0], [64], [64], [32, 64]])
    assert warm.scheduler.num_prompt_tokens_cached == 224


@pytest.mark.slow  # loads the real model
def test_smollm2_greedy_with_prefix_hits_equals_a_cold_run(make_engine) -> None:
    from distserve.model.loader import load
    from distserve.model.registry import resolve

    loaded = load(resolve("smollm2-135m"), dtype="float32")

    def config(caching: bool) -> EngineConfig:
        return EngineConfig(
            dtype="float32", cache=CacheConfig(num_blocks=256, prefix_caching=caching)
        )

    warm, cold = make_engine(config(True), loaded), make_engine(config(False), loaded)
    tok = loaded.tokenizer
    story = (
        "Once upon a time, in a small village at the edge of a great forest, there lived an "
        "old woodcutter and his three daughters. Every morning he walked into the woods with "
        "his axe, and every evening he came back with a bundle of firewood on his back. "
    ) * 4
    a = tok.encode(story + "What did the woodcutter carry home?")
    b = tok.encode(story + "How many daughters did he have?")
    common = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert len(a) > 200 and common > 160
    hit_a = 16 * ((len(a) - 1) // 16)  # all full blocks but the one with the last token
    hit_b = 16 * (common // 16)  # the full blocks of the story
    check_hits_equal_cold(warm, cold, [[a], [a], [b]], [[0], [hit_a], [hit_b]])
