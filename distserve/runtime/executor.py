"""How the controller reaches a worker: in this process, as a Ray actor, or an emulated
device in this process's event loop.

Every handle has the same async methods, so instance loops, migrations and tests do not
care where a worker runs. Calls to one worker are serialized (one step at a time).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from distserve.config import EngineConfig
from distserve.core import StepPlan
from distserve.runtime.emulated import EmulatedExecutor
from distserve.runtime.parallel_executor import ParallelExecutor
from distserve.runtime.worker.worker import STORE_PEER, Worker, WorkerInfo

if TYPE_CHECKING:
    from distserve.model.parallel import Shard
    from distserve.runtime.kv_store import StorePool, StoreRelay

TAG_LIMIT = 2**31
"""torch.distributed tags are non-negative 32-bit signed ints."""


class LocalExecutor:
    """A worker in this process; its calls run in a thread so the event loop stays free."""

    kind = "local"

    def __init__(self, worker: Worker, thread: ThreadPoolExecutor | None = None) -> None:
        self.worker = worker
        self.lock = asyncio.Lock()
        self._thread = thread or ThreadPoolExecutor(1, thread_name_prefix="distserve-worker")
        """Its own thread: the tensor ranks of an instance block in collectives until all
        have arrived, which a shared pool of threads could starve."""

    @classmethod
    async def start(
        cls,
        config: EngineConfig,
        cores: list[int] | None = None,
        shard: Shard | None = None,
        store: Any = None,
    ) -> LocalExecutor:
        thread = ThreadPoolExecutor(1, thread_name_prefix="distserve-worker")
        loop = asyncio.get_running_loop()
        worker = await loop.run_in_executor(
            thread, functools.partial(Worker, config, cores, None, False, shard, store)
        )
        return cls(worker, thread)

    async def _call(self, fn: Any, *args: Any) -> Any:
        async with self.lock:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def info(self) -> WorkerInfo:
        return self.worker.info()

    async def ping(self) -> int:
        return self.worker.ping()

    async def execute(self, plan: StepPlan, hidden: Any = None) -> Any:
        """The step's result (or, from a pipeline stage before the last, its hidden
        states for the next stage, which takes them as `hidden`)."""
        return await self._call(self.worker.execute, plan, hidden)

    async def read_blocks(self, block_ids: list[int]) -> np.ndarray[Any, Any]:
        return await self._call(self.worker.read_blocks, block_ids)  # type: ignore[no-any-return]

    async def write_blocks(self, block_ids: list[int], data: Any) -> int:
        return await self._call(self.worker.write_blocks, block_ids, data)  # type: ignore[no-any-return]

    async def attach_store(self, pool: StorePool) -> None:
        self.worker.use_store(pool.blocks)

    async def pull_from_store(self, slots: list[int], dst: list[int]) -> int:
        """Copy KV store slots into blocks of this worker (between its steps)."""
        store = self.worker.runner.store
        assert store is not None, "pull_from_store before attach_store"
        return await self._call(self.worker.cache.copy_from, store, slots, dst)  # type: ignore[no-any-return]

    async def close(self) -> None:
        self._thread.shutdown(wait=False)
        # The controller's objects refer to each other (instances, the request table, its
        # helpers): without this the model would wait for a full garbage collection.
        vars(self).pop("worker", None)  # (closing twice is harmless)


class RayExecutor:
    """A worker as a Ray actor that owns `num_cpus` cores (or one GPU)."""

    kind = "ray"

    def __init__(self, actor: Any, name: str) -> None:
        self.actor = actor
        self.name = name
        self.peers: set[str] = set()
        """Names of workers whose caches this one has mapped (same-node shared memory)."""
        self.rank: int | None = None
        """Its rank in the KV process group, once joined (None: not a member)."""
        self.backend: str | None = None
        self._tags = itertools.count()
        self.relay: StoreRelay | None = None
        """Set for a worker on another node than the KV store's pool (`relay_store`)."""

    @classmethod
    async def start(
        cls,
        config: EngineConfig,
        cores: list[int] | None,
        name: str,
        shard: Shard | None = None,
        store: str | None = None,
    ) -> RayExecutor:
        """`shard`, `store`: a rank of a parallel instance (runtime/parallel_executor.py),
        whose cache stays private (its KV moves re-sharded, through this process)."""
        import ray

        gpu = config.device.startswith("cuda")
        options: dict[str, Any] = {"num_cpus": 0 if gpu else len(cores or [0])}
        options["num_gpus"] = 1 if gpu else 0
        # Two threads: a KV transfer into this worker need not wait for its current step
        # (the blocks involved are owned by the migrating request, not by the step).
        actor = ray.remote(Worker).options(name=name, max_restarts=0, max_concurrency=2, **options)
        shared = not gpu and (shard is None or not shard.parallel)
        return cls(actor.remote(config, cores, None, shared, shard, store), name)

    async def info(self) -> WorkerInfo:
        return await self.actor.info.remote()  # type: ignore[no-any-return]

    async def ping(self) -> int:
        """The worker's pid; raises if the actor is dead (answers during a step: the
        actor has a second thread)."""
        return await self.actor.ping.remote()  # type: ignore[no-any-return]

    async def execute(self, plan: StepPlan, hidden: Any = None) -> Any:
        relay = self.relay
        if relay is not None and (plan.store_reads or plan.store_writes):
            reads = None
            if plan.store_reads:
                reads = await asyncio.to_thread(relay.read, [s for s, _ in plan.store_reads])
            out, written = await self.actor.execute_relayed.remote(plan, reads)
            if written is not None:
                await asyncio.to_thread(relay.write, plan.store_writes, written)
            return out
        if hidden is None:
            return await self.actor.execute.remote(plan)
        return await self.actor.execute.remote(plan, hidden)

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

    async def attach_store(self, pool: StorePool) -> None:
        assert pool.path is not None, "a Ray worker maps the KV store's /dev/shm file"
        await self.actor.attach_store.remote(pool.path, pool.shape)

    def relay_store(self, pool: StorePool) -> None:
        """Reach the KV store through this process (a worker on another node cannot map
        its file): store slots go with the steps and pulls, written KV comes back."""
        from distserve.runtime.kv_store import StoreRelay

        self.relay = StoreRelay(pool)

    async def pull_from_store(self, slots: list[int], dst: list[int]) -> int:
        """Copy KV store slots into blocks of this worker (beside a step: the blocks
        belong to the migrating request, not to the step)."""
        if self.relay is not None:
            data = await asyncio.to_thread(self.relay.read, slots)
            return await self.write_blocks(dst, data)
        return await self.actor.pull_from_peer.remote(STORE_PEER, slots, dst)  # type: ignore[no-any-return]

    async def pull_from_peer(self, peer: RayExecutor, src: list[int], dst: list[int]) -> int:
        return await self.actor.pull_from_peer.remote(peer.name, src, dst)  # type: ignore[no-any-return]

    # ---- torch.distributed point-to-point (see runtime/worker/p2p.py) ------------------
    async def join_group(
        self, address: str, port: int, rank: int, world_size: int, backend: str, timeout: float
    ) -> None:
        await self.actor.join_group.remote(address, port, rank, world_size, backend, timeout)
        self.rank, self.backend = rank, backend

    def next_tag(self) -> int:
        """A tag no earlier send of this worker used (the receiver matches sender + tag)."""
        return next(self._tags) % TAG_LIMIT

    async def post_send(self, tag: int, block_ids: list[int], dst_rank: int) -> int:
        return await self.actor.post_send.remote(tag, block_ids, dst_rank)  # type: ignore[no-any-return]

    async def recv_blocks(
        self, block_ids: list[int] | None, src_rank: int, tag: int, num_blocks: int
    ) -> int:
        return await self.actor.recv_blocks.remote(block_ids, src_rank, tag, num_blocks)  # type: ignore[no-any-return]

    async def finish_send(self, tag: int) -> bool:
        return await self.actor.finish_send.remote(tag)  # type: ignore[no-any-return]

    async def close(self) -> None:
        """Leave the KV process group (best effort, briefly), then end the actor."""
        import ray

        if self.rank is not None:
            self.rank = None
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await self.actor.leave_group.remote()
        ray.kill(self.actor, no_restart=True)


Executor = LocalExecutor | RayExecutor | EmulatedExecutor | ParallelExecutor
