"""KV migration transports: move a request's blocks from a prefill worker to a decode
worker. Every transfer reports bytes moved and seconds taken."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from distserve.runtime.executor import Executor, LocalExecutor, RayExecutor


@dataclass(frozen=True)
class TransferStats:
    num_bytes: int
    seconds: float
    transport: str


async def transfer_blocks(
    src: Executor, src_blocks: list[int], dst: Executor, dst_blocks: list[int]
) -> TransferStats:
    """Copy blocks src_blocks[i] of `src` into dst_blocks[i] of `dst`.

    Ray actors on one node: the destination copies out of the source's cache, which it has
    mapped from /dev/shm. Ray actors elsewhere: the destination pulls through the object
    store (the driver never touches the bytes). In one process: a tensor copy."""
    if len(src_blocks) != len(dst_blocks):
        raise ValueError(
            f"{len(src_blocks)} source blocks for {len(dst_blocks)} destination blocks"
        )
    t0 = time.perf_counter()
    if isinstance(src, RayExecutor) and isinstance(dst, RayExecutor) and src.name in dst.peers:
        n = await dst.pull_from_peer(src, src_blocks, dst_blocks)
        kind = "shared-memory"
    elif isinstance(src, RayExecutor) and isinstance(dst, RayExecutor):
        n = await dst.write_blocks(dst_blocks, src.read_blocks_ref(src_blocks))
        kind = "ray-object-store"
    elif isinstance(src, LocalExecutor) and isinstance(dst, LocalExecutor):
        n = await _copy_in_process(src, src_blocks, dst, dst_blocks)
        kind = "in-process"
    else:
        n = await dst.write_blocks(dst_blocks, await src.read_blocks(src_blocks))
        kind = "via-driver"
    return TransferStats(n, time.perf_counter() - t0, kind)


async def _copy_in_process(
    src: LocalExecutor, src_blocks: list[int], dst: LocalExecutor, dst_blocks: list[int]
) -> int:
    """Tensor copy between two workers of this process, holding both workers' locks
    (taken in a fixed order) so no step runs on either meanwhile."""

    def copy() -> int:
        data = src.worker.cache.read_blocks(src_blocks)
        dst.worker.cache.write_blocks(dst_blocks, data)
        return int(data.numel() * data.element_size())

    first, second = sorted((src, dst), key=id)
    async with first.lock:
        if second is first:
            return await asyncio.to_thread(copy)
        async with second.lock:
            return await asyncio.to_thread(copy)
