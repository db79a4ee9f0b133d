"""Run by tests/e2e/test_multinode.py in a process of its own (Ray allows one cluster per
driver): a Ray cluster of three nodes on this machine (ray.cluster_utils: a head with no
CPUs, two nodes of one CPU each), `Controller(ray_address=...)` serving 1P1D on it with a
KV store (in the controller's process on the head node: both workers reach it relayed,
cluster/store_link.py), then the decode worker killed under load (its requests resume
from the store), then the decode instance's whole node removed under load and a new node
added. Prints one JSON line with what happened."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

from ray.cluster_utils import Cluster

from distserve.cluster.controller import Controller
from distserve.config import EngineConfig, PlacementConfig
from distserve.core import CacheConfig, SamplingParams


async def run(cluster: Cluster, nodes: list[Any]) -> dict[str, Any]:
    engine = EngineConfig(dtype="float32", cache=CacheConfig(num_blocks=64))
    placement = PlacementConfig(mode="disagg", cores_per_instance=1)
    c = Controller(engine, placement, ray_address=cluster.address, kv_store_gb=0.05,
                   degrade_after=120.0)  # fmt: skip  # until the decode worker is back
    await c.start()
    try:
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        prompts = [f"Story {i}: once upon a time" for i in range(4)]

        async def one(prompt: str) -> list[int]:
            return list([o async for o in c.stream(c.submit(prompt, params))][-1].token_ids)

        reference = await asyncio.gather(*(one(p) for p in prompts))
        placed = [i.info.node for i in c.instances if i.info is not None]
        relayed = [i.executor.relay is not None for i in c.instances]  # type: ignore[union-attr]

        # the decode worker killed mid-decode: a new one pulls the KV from the store
        tasks = [asyncio.create_task(one(p)) for p in prompts]
        while not c.instances[1].scheduler.running:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        os.kill(c.instances[1].info.pid, signal.SIGKILL)  # type: ignore[union-attr]
        resumed = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        assert c.store is not None
        store_stats = c.store.directory.stats
        c.degraded.after = 2.0  # type: ignore[union-attr]

        dec = c.instances[1]
        victim = next(n for n in nodes if n.node_id == dec.info.node)  # type: ignore[union-attr]
        tasks = [asyncio.create_task(one(p)) for p in prompts]
        await asyncio.sleep(0.3)
        cluster.remove_node(victim)  # its raylet and the decode worker with it
        during = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        covered = [(i.name, i.role.value) for i in c.instances]
        reason = c.degraded.reason if c.degraded else None
        cluster.add_node(num_cpus=1)
        for _ in range(240):  # the decode instance restarts on the new node
            await asyncio.sleep(0.5)
            if c.degraded and not c.degraded.covering and all(i.alive for i in c.instances):
                break
        after = await one(prompts[0])
        for inst in c.instances:
            inst.scheduler.blocks.check_integrity()
        c.store.directory.check()
        return {
            "placed_on": placed,
            "relayed": relayed,
            "equal_after_resume": resumed == reference,
            "resumes": store_stats.resumes,
            "store_bytes_written": store_stats.bytes_written,
            "transports": dict(c.migration.completed),
            "equal_during_outage": during == reference,
            "covered": covered,
            "reason": reason,
            "roles_after": [i.role.value for i in c.instances],
            "equal_after": after == reference[0],
            "used_blocks": sum(i.scheduler.blocks.num_used_blocks for i in c.instances),
        }
    finally:
        await c.stop()


def main() -> None:
    t0 = time.time()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
    )
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        out = asyncio.run(run(cluster, nodes))
        out["seconds"] = time.time() - t0
        print("RESULT " + json.dumps(out), flush=True)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
