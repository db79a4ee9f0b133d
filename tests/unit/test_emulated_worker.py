"""Emulated devices without a controller: the worker's step times are the latency model's,
its tokens come from the stream, its KV bookkeeping catches a request reading another's
blocks, and the layout puts instances on nodes as the flags say."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from distserve.cluster.emulation import EmulatedCluster, layout, token_stream
from distserve.config import EmulationConfig, EngineConfig, PlacementConfig
from distserve.core import SamplingParams, ScheduledChunk, StepPlan
from distserve.model.registry import ARCHITECTURES
from distserve.model.tokenizer import Tokenizer
from distserve.runtime.emulated import EmulatedExecutor, Links
from distserve.runtime.transport import transfer_blocks
from distserve.runtime.worker.emulated import EmulatedDevice, EmulatedWorker, KVMismatch
from distserve.sim.latency import latency_model
from distserve.sim.profile import bundled_a100, find
from distserve.sim.serving_path import ServingPath

OPT = ARCHITECTURES["opt-13b"]
PARAMS = SamplingParams(max_tokens=8, temperature=0)


def device(node: int = 0, blocks: int = 64) -> EmulatedDevice:
    lat = latency_model(find(bundled_a100(), "opt-13b", 1), ServingPath())
    return EmulatedDevice(lat, blocks, 16, OPT, (11, 12, 13), node)


def chunk(rid: str, start: int, n: int, table: tuple[int, ...], out: int = 0) -> ScheduledChunk:
    return ScheduledChunk(rid, tuple(range(n)), start, table, PARAMS, output_index=out)


def test_a_step_costs_the_latency_model_and_samples_the_stream() -> None:
    worker = EmulatedWorker(device())
    plan = StepPlan(1, (chunk("a", 0, 40, (0, 1, 2)), chunk("b", 0, 20, (3, 4))))
    result = worker.execute(plan)
    assert result.elapsed == pytest.approx(worker.device.latency.step_time(plan))
    assert result.elapsed == pytest.approx(
        find(bundled_a100(), "opt-13b", 1).prefill_time([40, 20])
    )
    assert result.sampled == {"a": 11, "b": 11}
    decode = StepPlan(2, (chunk("a", 40, 1, (0, 1, 2), out=1), chunk("b", 20, 1, (3, 4), out=5)))
    assert worker.execute(decode).sampled == {"a": 12, "b": 13}  # output 5 wraps: 5 % 3


def test_reading_another_requests_blocks_fails_the_step() -> None:
    worker = EmulatedWorker(device())
    worker.execute(StepPlan(1, (chunk("a", 0, 20, (0, 1)),)))
    with pytest.raises(KVMismatch, match="holds the KV of 'a'"):
        worker.execute(StepPlan(2, (chunk("b", 20, 1, (0, 1)),)))
    # a migrated copy carries the owners along
    other = EmulatedWorker(device())
    other.write_blocks([5, 6], worker.read_blocks([0, 1]))
    other.execute(StepPlan(3, (chunk("a", 20, 1, (5, 6)),)))


def test_a_prefix_hit_may_read_another_requests_full_block_at_its_own_index() -> None:
    worker = EmulatedWorker(device())
    worker.execute(StepPlan(1, (chunk("a", 0, 40, (0, 1, 2)),)))
    # b's cached prefix is a's first two full blocks; it computes from position 32.
    worker.execute(StepPlan(2, (chunk("b", 32, 5, (0, 1, 3)),)))
    # a block that sat at another index in its writer's sequence is not that prefix
    with pytest.raises(KVMismatch, match="holds the KV of 'a'"):
        worker.execute(StepPlan(3, (chunk("c", 16, 3, (1, 4)),)))


def test_a_killed_worker_answers_nothing() -> None:
    worker = EmulatedWorker(device())
    worker.kill()
    with pytest.raises(RuntimeError, match="killed"):
        worker.ping()


@pytest.mark.serial  # wake-ups within 3 ms
def test_steps_end_at_their_deadlines_and_a_pull_takes_the_links_time() -> None:
    """Medians over a few sleeps: one wake-up may be late when the host is busy."""
    links = Links(intra_node=1e12, inter_node=4e9)

    async def run() -> tuple[float, float]:
        a, b = EmulatedExecutor(device(0), links), EmulatedExecutor(device(1), links)
        steps, pulls = [], []
        for i in range(5):
            plan = StepPlan(i, (chunk("r", 0, 100, tuple(range(7))),))  # ~20 ms
            t0 = time.perf_counter()
            result = await a.execute(plan)
            steps.append(time.perf_counter() - t0 - result.elapsed)
            t0 = time.perf_counter()
            stats = await transfer_blocks(a, list(range(7)), b, list(range(32, 39)))
            assert stats.transport == "emulated" and stats.num_bytes == 7 * 16 * 819200
            pulls.append(time.perf_counter() - t0 - stats.num_bytes / 4e9)  # ~23 ms
        b.worker.execute(StepPlan(9, (chunk("r", 100, 1, tuple(range(32, 39)), out=1),)))
        return statistics.median(steps), statistics.median(pulls)

    late_step, late_pull = asyncio.run(run())
    assert -0.002 < late_step < 0.003 and -0.002 < late_pull < 0.003


def test_layout_interleaves_roles_and_keeps_instances_on_one_node() -> None:
    placement = PlacementConfig(
        num_prefill=2, num_decode=2, prefill_tp=2, decode_pp=2, emulated=True
    )
    spots = layout(placement, EmulationConfig(num_nodes=2, devices_per_node=4))
    # roles: prefill-0, prefill-1, decode-0 (2 stages), decode-1 (2 stages)
    assert spots == [(0, (0, 1)), (1, (0, 1)), (0, (2, 3)), (0, (2, 3)), (1, (2, 3)), (1, (2, 3))]
    with pytest.raises(ValueError, match="needs 8 devices"):
        layout(placement, EmulationConfig(num_nodes=1, devices_per_node=4))


def test_a_pipeline_counts_as_one_instance_per_stage() -> None:
    with pytest.raises(ValueError, match="parallel degrees must be >= 1"):
        PlacementConfig(prefill_tp=0)
    placement = PlacementConfig(prefill_tp=2, decode_pp=2)
    assert placement.roles == ["prefill", "decode", "decode"]
    assert placement.groups == [("prefill", 2, 1), ("decode", 1, 2)]


def test_cluster_takes_the_profiles_capacity_per_shape() -> None:
    placement = PlacementConfig(prefill_tp=2, decode_pp=2, emulated=True)
    emulation = EmulationConfig(tokenizer="bytes")
    cluster = EmulatedCluster(EngineConfig(model="opt-13b"), placement, emulation)
    prefill, dec0, dec1 = cluster.devices
    assert prefill.num_blocks == 163008 // 16  # opt-13b tp2 pp1 (max_num_tokens.csv)
    assert dec0.num_blocks == dec1.num_blocks == 163008 // 2 // 16  # tp1 pp2, per stage
    assert prefill.latency.profile.tp == 2
    assert dec0.latency.profile.decode_small[0] > find(bundled_a100(), "opt-13b", 1).decode_small[0]


def test_the_token_stream_has_no_special_token() -> None:
    tok = Tokenizer.bytes_only(OPT.vocab_size, eos_token_id=ord("e"))
    stream = token_stream(tok, seed=1)
    assert ord("e") not in stream and len(stream) > 100
    assert stream == token_stream(tok, seed=1) != token_stream(tok, seed=2)
