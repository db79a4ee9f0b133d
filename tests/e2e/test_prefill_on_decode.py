"""The per-request rule on the real model in 1P1D (serve --prefill-on-decode): a short
prompt is prefilled and decoded by the decode instance (no migration, the step trace shows
the decode instance's prefill step), a long one goes through the prefill instance; greedy
float32 outputs equal the normal path's."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from distserve.cluster.controller import Controller
from distserve.cluster.decode_prefill import DecodePrefillConfig
from distserve.config import EngineConfig, PlacementConfig
from distserve.core import CacheConfig, SamplingParams, SchedulerConfig
from distserve.sim.profile import Profile, save_profiles

ENGINE = EngineConfig(
    dtype="float32",
    cache=CacheConfig(num_blocks=128),
    scheduler=SchedulerConfig(max_num_batched_tokens=512, max_model_len=512),
)
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SHORT = "What is the capital of France? Answer:"
LONG = "The old lighthouse keeper counted the ships that passed each night. " * 12 + "Why?"
TPOT = 0.1
# Round numbers (what a CPU profile would hold): a prompt costs 10 ms + 1 ms per token,
# so ~10 tokens take 20 ms (fits one TPOT target on decode) and ~150 take 160 ms (never).
ROUND = Profile(
    "smollm2-135m",
    "cpu",
    prefill=(0.01, 0.001, 0.0),
    decode_small=(0.01, 0.0, 0.001),
    decode_large=(0.01, 0.0, 0.001),
)


async def _serve(rule: DecodePrefillConfig | None, trace: str) -> tuple[list[list[int]], int]:
    """Outputs of SHORT then LONG, one at a time, and the migrations made."""
    c = Controller(
        ENGINE, PlacementConfig(mode="disagg"), use_ray=False, step_trace=trace,
        prefill_on_decode=rule,
    )  # fmt: skip
    await c.start()
    try:
        outs = []
        for prompt in (SHORT, LONG):
            stream = c.stream(c.submit(prompt, PARAMS))
            outs.append(list([o async for o in stream][-1].token_ids))
        for inst in c.instances:
            inst.scheduler.blocks.check_integrity()
            assert inst.scheduler.blocks.num_used_blocks == 0, inst.name
        return outs, sum(c.migration.completed.values())
    finally:
        await c.stop()


@pytest.mark.slow  # the real model in two in-process workers, twice
def test_a_short_prompt_is_served_by_decode_without_migration(tmp_path: Path) -> None:
    profile = tmp_path / "profile.json"
    save_profiles(str(profile), [ROUND])

    async def run() -> None:
        reference, moved = await _serve(None, str(tmp_path / "plain.jsonl"))
        assert moved == 2 and all(len(t) == PARAMS.max_tokens for t in reference)
        rule = DecodePrefillConfig(TPOT, str(profile))
        outs, moved = await _serve(rule, str(tmp_path / "rule.jsonl"))
        assert outs == reference
        assert moved == 1  # the long prompt's KV only
        lines = (tmp_path / "rule.jsonl").read_text().splitlines()
        steps = [json.loads(line) for line in lines]
        on_decode = [s for s in steps if s["role"] == "decode" and s["prefill"]]
        assert len(on_decode) == 1 and on_decode[0]["prefill"][0] < 20  # SHORT, whole
        on_prefill = [s for s in steps if s["role"] == "prefill"]
        assert len(on_prefill) == 1 and on_prefill[0]["prefill"][0] > 100  # LONG

    asyncio.run(run())
