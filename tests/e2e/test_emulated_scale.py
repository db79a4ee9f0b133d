"""Emulated devices at the scale of issue 20's experiment 2 (OPT-66B, nodes of 8 A100s),
kept small: a tp2 x pp2 prefill instance and a tp8 decode instance that fills a node
of its own, so every KV migration crosses nodes; the real controller gives
each request the TTFT and TPOT the simulator gives it with the cross-node link. And
`serve --emulate` refuses a Ray address (emulated devices are not Ray actors)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from distserve.cli import main
from distserve.cluster.controller import Controller
from distserve.config import CROSS_NODE_BANDWIDTH, EmulationConfig, EngineConfig, PlacementConfig
from distserve.sim.serving_path import ServingPath
from distserve.sim.simulator import SimConfig, Simulator
from distserve.workload.build import WorkloadSpec, build_workload
from tests.e2e.test_emulated import assert_all_blocks_free, close, frozen_heap, replay

PLACEMENT = PlacementConfig(
    num_prefill=1, num_decode=1, prefill_tp=2, prefill_pp=2, decode_tp=8, emulated=True
)  # fmt: skip
"""The 66B plan's shapes (benchmarks/emulated_66b.py), one instance of each."""


@pytest.mark.serial  # measured times against the simulator's
def test_opt66b_across_nodes_matches_the_simulator_per_request() -> None:
    emulation = EmulationConfig(tokenizer="bytes", num_nodes=2, devices_per_node=8)
    controller = Controller(EngineConfig(model="opt-66b"), PLACEMENT, emulation=emulation)
    assert controller.emulated is not None
    nodes = [(d.node, len(d.devices)) for d in controller.emulated.devices]
    assert nodes == [(0, 4), (0, 4), (1, 8)]  # 2 prefill stages, then decode
    spec = WorkloadSpec(
        dataset="random", num_requests=6, rate=1.5, seed=5, prompt_len=(64, 1024),
        output_len=(8, 32),
    )  # fmt: skip
    workload = build_workload(spec, controller.tokenizer)

    async def run() -> list:  # type: ignore[type-arg]
        await controller.start()
        try:
            timings = await replay(controller, workload)
            assert_all_blocks_free(controller)
            assert dict(controller.migration.completed) == {"emulated": 6}
            return timings
        finally:
            await controller.stop()

    with frozen_heap():
        timings = asyncio.run(run())
    devices = controller.emulated.devices
    path = ServingPath(transfer_bandwidth=CROSS_NODE_BANDWIDTH)
    latency = {r: dataclasses.replace(d.latency, path=path) for r, d in ((
        "prefill", devices[0]), ("decode", devices[2]))}  # fmt: skip
    blocks = {"prefill": devices[0].num_blocks, "decode": devices[2].num_blocks}
    sim_placement = PlacementConfig(num_prefill=2, num_decode=1)  # pp virtual instances
    scheduler = controller.engine_config.scheduler
    sim = Simulator(SimConfig(sim_placement, latency, blocks, scheduler, 16)).run(workload)
    for wr, real, s in zip(workload.requests, timings, sim, strict=True):
        assert s.ttft is not None and s.tpot is not None
        assert close(real.ttft, s.ttft), (wr.index, wr.prompt_len, real.ttft, s.ttft)
        assert close(real.tpot, s.tpot), (wr.index, wr.output_len, real.tpot, s.tpot)


def test_serve_emulate_refuses_a_ray_address(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--emulate", "a100", "--model", "opt-13b", "--ray-address", "x:1"]
    with pytest.raises(SystemExit) as e:  # --port -1: without the check, a --port error
        main(["serve", *args, "--port", "-1"])
    assert e.value.code == 2
    assert "--ray-address: emulated devices run in the controller's process" in (
        capsys.readouterr().err
    )
