"""An instance of tensor degree tp and pipeline degree pp: tp x pp workers behind one
executor handle, so the instance loop, migration and recovery see one worker.

- Every step plan goes to all ranks of stage 0, then (with the hidden states stage 0 hands
  on) to all ranks of stage 1, and so on; the last stage's tensor rank 0 returns the
  sampled tokens. Tensor ranks of a stage run the step together (their collectives meet).
- A pipeline of pp stages serves pp *slots*, as the planner and the simulator model it
  (design note 6): pp virtual instances, each with its own scheduler and its own share of
  every stage's KV cache, whose steps overlap in the stages (slot 1 in stage 0 while
  slot 0 is in stage 1). A stage takes one step at a time, in the order the steps reach
  it; so do all of its tensor ranks.
- KV moves in the whole model's layout [layers*2*kv_heads, n, block_size*head_dim]: a
  read gathers each worker's heads and layers into it, a write cuts it into each
  worker's part. So a prefill instance of one (tp, pp) feeds a decode instance of any
  other, both ways (re-sharding by heads and by layers).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from distserve.config import EngineConfig
from distserve.core import StepPlan, StepResult
from distserve.core.shards import KVPart, kv_parts
from distserve.runtime.worker.worker import WorkerInfo

if TYPE_CHECKING:
    from distserve.runtime.executor import LocalExecutor, RayExecutor

    RankExecutor = LocalExecutor | RayExecutor


def split_cores(cores: list[int], n: int) -> list[list[int]]:
    """Consecutive core sets for n workers (shared round-robin when there are fewer)."""
    if not cores:
        return [[] for _ in range(n)]
    k = max(1, len(cores) // n)
    return [[cores[(i * k + j) % len(cores)] for j in range(k)] for i in range(n)]


def offset_plan(plan: StepPlan, blocks: int, swap: int) -> StepPlan:
    """The plan with device block ids moved up by `blocks` and host ones by `swap`."""
    if blocks == 0 and swap == 0:
        return plan
    chunks = tuple(
        dataclasses.replace(c, block_table=tuple(b + blocks for b in c.block_table))
        for c in plan.chunks
    )
    return dataclasses.replace(
        plan,
        chunks=chunks,
        swap_out=tuple((d + blocks, h + swap) for d, h in plan.swap_out),
        swap_in=tuple((h + swap, d + blocks) for h, d in plan.swap_in),
        block_copies=tuple((a + blocks, b + blocks) for a, b in plan.block_copies),
    )


def _span(r: range) -> slice:
    return slice(r.start, r.stop)


class WorkerGroup:
    """The workers of one parallel instance, `stages[s][t]`, shared by its slots."""

    def __init__(self, stages: list[list[RankExecutor]], store_path: str | None) -> None:
        self.stages = stages
        self.tp, self.pp = len(stages[0]), len(stages)
        self.store_path = store_path
        self._locks = [asyncio.Lock() for _ in stages]
        self._infos: list[list[WorkerInfo]] | None = None
        self._open_slots = self.pp
        self._successor: asyncio.Task[list[ParallelExecutor]] | None = None

    @property
    def workers(self) -> list[RankExecutor]:
        return [w for stage in self.stages for w in stage]

    async def infos(self) -> list[list[WorkerInfo]]:
        if self._infos is None:
            got = await asyncio.gather(*(w.info() for w in self.workers))
            self._infos = [list(got[s * self.tp : (s + 1) * self.tp]) for s in range(self.pp)]
            nodes = {i.node for i in got}
            if len(nodes) > 1:
                raise ValueError(
                    f"the {self.tp * self.pp} workers of one tp={self.tp} pp={self.pp} instance "
                    f"landed on {len(nodes)} nodes; an instance's workers must share one node"
                )
        return self._infos

    async def execute(self, plan: StepPlan) -> StepResult:
        hidden: Any = None
        for lock, stage in zip(self._locks, self.stages, strict=True):
            async with lock:
                outs = await asyncio.gather(*(w.execute(plan, hidden) for w in stage))
            hidden = outs[0]
        assert isinstance(hidden, StepResult)
        return hidden

    async def parts(self) -> list[list[KVPart]]:
        cfg = (await self.infos())[0][0].model_config
        return kv_parts(cfg.num_layers, cfg.num_kv_heads, self.tp, self.pp)

    async def read_blocks(self, block_ids: list[int]) -> np.ndarray[Any, Any]:
        """The blocks in the whole model's layout (module docstring): each worker's
        [layers*2*heads, n, w] placed at its (layer, head) ranges."""
        parts, got = (
            await self.parts(),
            await asyncio.gather(*(w.read_blocks(block_ids) for w in self.workers)),
        )
        cfg = (await self.infos())[0][0].model_config
        n = len(block_ids)
        width = np.asarray(got[0]).shape[-1]
        whole = np.empty((cfg.num_layers, 2, cfg.num_kv_heads, n, width), np.asarray(got[0]).dtype)
        for part, data in zip([p for stage in parts for p in stage], got, strict=True):
            shape = (len(part.layers), 2, len(part.heads), n, width)
            whole[_span(part.layers), :, _span(part.heads)] = np.asarray(data).reshape(shape)
        return whole.reshape(-1, n, width)

    async def write_blocks(self, block_ids: list[int], data: Any) -> int:
        """Store blocks given in the whole model's layout: each worker gets its ranges."""
        parts, cfg = await self.parts(), (await self.infos())[0][0].model_config
        n = len(block_ids)
        whole = np.asarray(data).reshape(cfg.num_layers, 2, cfg.num_kv_heads, n, -1)
        writes = []
        for stage, workers in zip(parts, self.stages, strict=True):
            for part, w in zip(stage, workers, strict=True):
                cut = whole[_span(part.layers), :, _span(part.heads)]
                writes.append(
                    w.write_blocks(
                        block_ids, np.ascontiguousarray(cut).reshape(-1, n, whole.shape[-1])
                    )
                )
        return sum(await asyncio.gather(*writes))

    async def ping(self) -> int:
        pids = await asyncio.gather(*(w.ping() for w in self.workers))
        return pids[0]

    async def restarted_slot(
        self, slot: int, start: Callable[[], Awaitable[list[ParallelExecutor]]]
    ) -> ParallelExecutor:
        """Slot `slot` of the group that replaces this (dead) one: the first slot to ask
        starts it, the others get their slot of the same one."""
        if self._successor is not None and self._successor.done():
            failed = self._successor.exception() is not None
            if not failed:
                try:  # started, but its workers may have died since (a lost cluster)
                    await self._successor.result()[0].group.ping()
                except Exception:
                    failed = True
            if failed:
                self._successor = None
        if self._successor is None:
            self._successor = asyncio.ensure_future(start())
        return (await asyncio.shield(self._successor))[slot]

    async def close_slot(self) -> None:
        """One slot is done with the group; the last one closes the workers."""
        self._open_slots -= 1
        if self._open_slots == 0:
            await self.close()

    async def close(self) -> None:
        self._open_slots = 0
        await asyncio.gather(*(w.close() for w in self.workers), return_exceptions=True)
        if self.store_path is not None:
            for s in range(self.pp):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{self.store_path}-{s}")


class ParallelExecutor:
    """One slot of a parallel instance (one virtual instance of a pipeline)."""

    kind = "parallel"

    def __init__(self, group: WorkerGroup, slot: int) -> None:
        self.group, self.slot = group, slot
        self._blocks = 0
        """Device blocks per slot (the workers' blocks split pp ways), once known."""
        self._swap = 0

    @classmethod
    async def start(
        cls,
        config: EngineConfig,
        cores: list[int] | None,
        name: str,
        use_ray: bool,
        tp: int,
        pp: int,
    ) -> list[ParallelExecutor]:
        """Start the tp x pp workers of one instance; returns its pp slots."""
        from distserve.model.parallel import Shard
        from distserve.runtime.executor import LocalExecutor, RayExecutor

        shards = [Shard(t, tp, s, pp) for s in range(pp) for t in range(tp)]
        store_path: str | None = None
        if use_ray:
            store_path = os.path.join(tempfile.gettempdir(), f"distserve-tp-{uuid.uuid4().hex}")
            worker_cores = split_cores(list(cores or []), len(shards))
            starts = [
                RayExecutor.start(
                    config, c or None, f"{name}-s{sh.pp_rank}t{sh.tp_rank}", sh, store_path
                )
                for sh, c in zip(shards, worker_cores, strict=True)
            ]
        else:
            import torch.distributed as dist

            store = dist.HashStore()
            starts = [LocalExecutor.start(config, None, sh, store) for sh in shards]
        workers = list(await asyncio.gather(*starts))
        group = WorkerGroup([workers[s * tp : (s + 1) * tp] for s in range(pp)], store_path)
        return [cls(group, v) for v in range(pp)]

    async def info(self) -> WorkerInfo:
        infos = await self.group.infos()
        flat = [i for stage in infos for i in stage]
        first = infos[0][0]
        self._blocks = first.num_blocks // self.group.pp
        self._swap = first.num_swap_blocks // self.group.pp
        cores = tuple(sorted({c for i in flat for c in i.cores}))
        return dataclasses.replace(
            first,
            num_blocks=self._blocks,
            num_swap_blocks=self._swap,
            bytes_per_block=sum(i.bytes_per_block for i in flat),
            cores=cores,
            load_seconds=max(i.load_seconds for i in flat),
            shm_path=None,
            cache_shape=(),
            kernel_rows=None,
        )

    def _ids(self, block_ids: list[int]) -> list[int]:
        base = self.slot * self._blocks
        return [b + base for b in block_ids]

    async def ping(self) -> int:
        return await self.group.ping()

    async def execute(self, plan: StepPlan) -> StepResult:
        if not self._blocks:
            await self.info()
        return await self.group.execute(
            offset_plan(plan, self.slot * self._blocks, self.slot * self._swap)
        )

    async def read_blocks(self, block_ids: list[int]) -> np.ndarray[Any, Any]:
        if not self._blocks:
            await self.info()
        return await self.group.read_blocks(self._ids(block_ids))

    async def write_blocks(self, block_ids: list[int], data: Any) -> int:
        if not self._blocks:
            await self.info()
        return await self.group.write_blocks(self._ids(block_ids), data)

    async def close(self) -> None:
        await self.group.close_slot()
