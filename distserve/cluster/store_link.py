"""The controller's KV store (serve --kv-store-gb): the pool of host memory
(runtime/kv_store.py), its directory (core/kv_store.py), the workers that write
through to it, and the resumption of a dead decode instance's requests from it; with
serve --kv-store-disk-gb, a spill file (runtime/kv_store.py SpillFile) the directory
spills evicted prefix blocks to and reads them back from (this process does the I/O,
synchronously inside the directory's calls, before the step that reuses a slot is sent)."""

from __future__ import annotations

import logging
import time

from distserve.cluster.request_table import RequestState, RequestTable
from distserve.config import EngineConfig
from distserve.core import Request
from distserve.core.kv_store import KVStore
from distserve.core.request import resume_copy
from distserve.model.config import ModelConfig
from distserve.runtime.executor import Executor, LocalExecutor, RayExecutor
from distserve.runtime.instance import Instance, Role
from distserve.runtime.kv_store import SpillFile, StorePool

log = logging.getLogger(__name__)


class StoreLink:
    """One pool and its directory, for the workers of one controller."""

    def __init__(
        self,
        engine: EngineConfig,
        model: ModelConfig,
        gib: float,
        use_ray: bool,
        disk_gib: float = 0.0,
        disk_dir: str | None = None,
    ) -> None:
        """`disk_gib`: GiB of the disk tier (0: none), in a file under `disk_dir` (None:
        the system's temporary directory)."""
        from distserve.model.loader import DTYPES

        if gib <= 0:
            raise ValueError(f"--kv-store-gb must be > 0, got {gib}")
        if engine.device != "cpu":
            raise ValueError("--kv-store-gb: the KV store is host memory mapped by CPU workers")
        if disk_gib > 0 and not engine.cache.prefix_caching:
            raise ValueError(
                "--kv-store-disk-gb: the disk tier keeps prefixes: it needs them cached"
            )
        t0 = time.perf_counter()
        block_size = engine.cache.block_size
        self.pool = StorePool(model, gib, block_size, DTYPES[engine.dtype], shared=use_ray)
        self.spill: SpillFile | None = None
        if disk_gib > 0:
            try:
                self.spill = SpillFile(self.pool, disk_gib, disk_dir)
            except BaseException:
                self.pool.close()
                raise
        self.directory = KVStore(
            self.pool.num_slots, block_size, engine.prefix_cache_key, self.pool.bytes_per_slot,
            serves_prefixes=engine.cache.prefix_caching,
            num_disk_slots=self.spill.num_slots if self.spill else 0, disk=self.spill,
        )  # fmt: skip
        log.info(
            "KV store: %d slots of %d tokens (%.2f GiB) in %.1f s",
            self.pool.num_slots, block_size, self.pool.num_bytes / 2**30, time.perf_counter() - t0,
        )  # fmt: skip
        if self.spill is not None:
            log.info(
                "KV store disk tier: %d slots (%.2f GiB) under %s", self.spill.num_slots,
                self.spill.num_bytes / 2**30, disk_dir or "the temporary directory",
            )  # fmt: skip

    async def attach(self, inst: Instance) -> None:
        """Let the instance's worker map the store and its steps write through to it; a
        Ray worker on another node reaches it through this process instead (RayExecutor
        relay_store). A worker of a kind that cannot, emulated or tensor/pipeline-parallel,
        runs without: its requests are recomputed after a fault, as without a store."""
        if not can_map(inst.executor):
            return
        if _same_node(inst):
            await inst.executor.attach_store(self.pool)  # type: ignore[union-attr]
        else:
            assert isinstance(inst.executor, RayExecutor)
            inst.executor.relay_store(self.pool)
        inst.store = self.directory
        inst.scheduler.remote_prefix = self.directory.prefix_blocks  # (each step sets it too)

    def resume(
        self, dead: Instance, state: RequestState, req: Request, table: RequestTable
    ) -> bool:
        """A request of the dead instance `dead` goes to a decode instance that pulls its KV
        from the store (cluster/migration.py Migrations.resume): one that was decoding there,
        or one that was prefilled there and waited for a decode instance (a copy already
        queued on a live decode instance stays: its admission pulls from the store). False
        if the store lacks it or no decode instance exists: it is recomputed instead."""
        rid = req.request_id
        if dead.role == Role.COLOCATED or not any(i.store for i in table.decode_instances):
            return False  # no decode instance could pull it (none, or none maps the store)
        if self.directory.resume_slots(rid, req.num_tokens) is None:
            return False  # still being prefilled, or the store was full
        state.from_store = True
        queued = state.decode
        if queued is not None and queued.alive and rid in queued.scheduler.requests:
            return True
        state.decode = None
        table.awaiting.append((state, resume_copy(req)))
        return True

    def release(self, request_id: str) -> None:
        self.directory.release(request_id)

    def close(self) -> None:
        self.pool.close()
        if self.spill is not None:
            self.spill.close()


def can_map(executor: Executor) -> bool:
    """Whether a worker can reach the store (a CPU worker in this process or a Ray actor:
    mapped on this node, relayed from another)."""
    return isinstance(executor, LocalExecutor | RayExecutor)


def _same_node(inst: Instance) -> bool:
    """A Ray worker on another node cannot map this node's /dev/shm."""
    if not isinstance(inst.executor, RayExecutor) or inst.info is None:
        return True
    import ray

    return inst.info.node == ray.get_runtime_context().get_node_id()
