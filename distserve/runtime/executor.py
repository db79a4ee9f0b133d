"""How the controller reaches a worker: in this process, or as a Ray actor.

Both handles have the same async methods, so instance loops, migrations and tests do not
care where a worker runs. Calls to one worker are serialized (one step at a time).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from distserve.config import EngineConfig
from distserve.core import StepPlan, StepResult
from distserve.runtime.worker import Worker, WorkerInfo


class LocalExecutor:
    """A worker in this process; its calls run in a thread so the event loop stays free."""

    kind = "local"

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.lock = asyncio.Lock()

    @classmethod
    async def start(cls, config: EngineConfig, cores: list[int] | None = None) -> LocalExecutor:
        return cls(await asyncio.to_thread(Worker, config, cores))

    async def _call(self, fn: Any, *args: Any) -> Any:
        async with self.lock:
            return await asyncio.to_thread(fn, *args)

    async def info(self) -> WorkerInfo:
        return self.worker.info()

    async def execute(self, plan: StepPlan) -> StepResult:
        return await self._call(self.worker.execute, plan)  # type: ignore[no-any-return]

    async def read_blocks(self, block_ids: list[int]) -> np.ndarray[Any, Any]:
        return await self._call(self.worker.read_blocks, block_ids)  # type: ignore[no-any-return]

    async def write_blocks(self, block_ids: list[int], data: Any) -> int:
        return await self._call(self.worker.write_blocks, block_ids, data)  # type: ignore[no-any-return]

    async def close(self) -> None:
        pass


class RayExecutor:
    """A worker as a Ray actor that owns `num_cpus` cores (or one GPU)."""

    kind = "ray"

    def __init__(self, actor: Any, name: str) -> None:
        self.actor = actor
        self.name = name
        self.peers: set[str] = set()
        """Names of workers whose caches this one has mapped (same-node shared memory)."""

    @classmethod
    async def start(cls, config: EngineConfig, cores: list[int] | None, name: str) -> RayExecutor:
        import ray

        gpu = config.device.startswith("cuda")
        options: dict[str, Any] = {"num_cpus": 0 if gpu else len(cores or [0])}
        options["num_gpus"] = 1 if gpu else 0
        actor = ray.remote(Worker).options(name=name, max_restarts=0, **options)
        return cls(actor.remote(config, cores, None, not gpu), name)

    async def info(self) -> WorkerInfo:
        return await self.actor.info.remote()  # type: ignore[no-any-return]

    async def execute(self, plan: StepPlan) -> StepResult:
        return await self.actor.execute.remote(plan)  # type: ignore[no-any-return]

    async def read_blocks(self, block_ids: list[int]) -> Any:
        return await self.actor.read_blocks.remote(block_ids)

    def read_blocks_ref(self, block_ids: list[int]) -> Any:
        """An object-store reference to the blocks, for another actor to pull directly."""
        return self.actor.read_blocks.remote(block_ids)

    async def write_blocks(self, block_ids: list[int], data: Any) -> int:
        return await self.actor.write_blocks.remote(block_ids, data)  # type: ignore[no-any-return]

    async def attach_peer(self, peer: RayExecutor, info: WorkerInfo) -> None:
        assert info.shm_path is not None
        await self.actor.attach_peer.remote(peer.name, info.shm_path, info.cache_shape)
        self.peers.add(peer.name)

    async def unlink_shared(self) -> None:
        await self.actor.unlink_shared.remote()

    async def pull_from_peer(self, peer: RayExecutor, src: list[int], dst: list[int]) -> int:
        return await self.actor.pull_from_peer.remote(peer.name, src, dst)  # type: ignore[no-any-return]

    async def close(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)


Executor = LocalExecutor | RayExecutor
