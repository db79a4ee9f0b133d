"""KV migration transports: move a request's blocks from a prefill worker to a decode
worker. Every transfer reports bytes moved, seconds taken and the transport used.

Which transport a pair of executors uses was decided when the workers were connected
(`cluster.placement.connect_peers`, `cluster.process_group.join_process_group`); this
module only reads that from the executors:

| transport      | when                                                   |
| -------------- | ------------------------------------------------------ |
| `in-process`   | two LocalExecutors: a tensor copy                      |
| `shm`          | Ray actors, the destination has mapped the source's cache |
| `gloo`, `nccl` | Ray actors that joined the KV process group             |
| `object-store` | other Ray actors: the destination pulls a Ray object    |
| `via-driver`   | a local and a Ray worker: through this process          |
| `emulated`     | two emulated devices: the KV bytes over their link's bandwidth |
| `reshard`      | a tp/pp > 1 instance on either side: through this process, re-cut |
| `none`         | nothing to move: the destination's prefix cache held every block |
| `store`        | from the KV store's slots (runtime/kv_store.py), which the worker maps |
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from distserve.config import TRANSPORTS
from distserve.runtime.emulated import EmulatedExecutor
from distserve.runtime.executor import Executor, LocalExecutor, RayExecutor
from distserve.runtime.parallel_executor import ParallelExecutor

log = logging.getLogger(__name__)


def check_transport(transport: str, use_ray: bool, device: str) -> None:
    """Raise ValueError for a transport this controller cannot use."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}: choose one of {', '.join(TRANSPORTS)}")
    if transport != "auto" and not use_ray:
        raise ValueError(
            f"transport {transport!r} moves KV between Ray actors; without Ray, workers "
            "share this process and copy tensors (use transport 'auto')"
        )
    cuda = device.startswith("cuda")
    if transport == "gloo" and cuda:
        raise ValueError("transport 'gloo' moves CPU tensors; on a GPU use 'nccl'")
    if transport == "nccl" and not cuda:
        raise ValueError("transport 'nccl' needs a cuda device; on CPU use 'gloo'")
    if transport == "shm" and cuda:
        raise ValueError("transport 'shm' maps CPU caches; on a GPU use 'nccl'")


@dataclass(frozen=True)
class TransferStats:
    num_bytes: int
    seconds: float
    transport: str
    """One of the names in this module's table."""


async def transfer_blocks(
    src: Executor, src_blocks: list[int], dst: Executor, dst_blocks: list[int]
) -> TransferStats:
    """Copy blocks src_blocks[i] of `src` into dst_blocks[i] of `dst`.

    The caller owns both block lists for the duration: the source blocks stay allocated
    and unchanged, the destination blocks are written by nobody else. If this is cancelled
    (a timeout), a Ray call already submitted still runs; any later call to the same worker
    runs after it, so a late write lands before the blocks can be reused."""
    if len(src_blocks) != len(dst_blocks):
        raise ValueError(
            f"{len(src_blocks)} source blocks for {len(dst_blocks)} destination blocks"
        )
    if not src_blocks:  # the destination's prefix cache held every block
        return TransferStats(0, 0.0, "none")
    t0 = time.perf_counter()
    if isinstance(src, ParallelExecutor) or isinstance(dst, ParallelExecutor):
        n = await dst.write_blocks(dst_blocks, await src.read_blocks(src_blocks))
        kind = "reshard"
    elif isinstance(src, RayExecutor) and isinstance(dst, RayExecutor):
        if src.name in dst.peers:
            n = await dst.pull_from_peer(src, src_blocks, dst_blocks)
            kind = "shm"
        elif src.rank is not None and dst.rank is not None:
            n = await _point_to_point(src, src_blocks, dst, dst_blocks)
            kind = src.backend or "p2p"
        else:
            n = await dst.write_blocks(dst_blocks, src.read_blocks_ref(src_blocks))
            kind = "object-store"
    elif isinstance(src, LocalExecutor) and isinstance(dst, LocalExecutor):
        n = await _copy_in_process(src, src_blocks, dst, dst_blocks)
        kind = "in-process"
    elif isinstance(src, EmulatedExecutor) and isinstance(dst, EmulatedExecutor):
        n = await dst.pull_from(src, src_blocks, dst_blocks)
        kind = "emulated"
    else:
        n = await dst.write_blocks(dst_blocks, await src.read_blocks(src_blocks))
        kind = "via-driver"
    return TransferStats(n, time.perf_counter() - t0, kind)


async def load_from_store(slots: list[int], dst: Executor, dst_blocks: list[int]) -> TransferStats:
    """Copy KV store slots into blocks of `dst` (a worker that mapped the store)."""
    if len(slots) != len(dst_blocks):
        raise ValueError(f"{len(slots)} store slots for {len(dst_blocks)} destination blocks")
    if not slots:
        return TransferStats(0, 0.0, "none")
    if not isinstance(dst, LocalExecutor | RayExecutor):
        raise TypeError(f"a {type(dst).__name__} does not map the KV store")
    t0 = time.perf_counter()
    n = await dst.pull_from_store(slots, dst_blocks)
    relayed = isinstance(dst, RayExecutor) and dst.relay is not None
    return TransferStats(n, time.perf_counter() - t0, "store-relay" if relayed else "store")


async def _point_to_point(
    src: RayExecutor, src_blocks: list[int], dst: RayExecutor, dst_blocks: list[int]
) -> int:
    """isend on the source, blocking recv on the destination, then release the send.

    The recv is submitted only once the send is posted, so the decode worker never
    blocks waiting for a prefill step to end. The three calls run as one shielded task:
    if the caller gives up (timeout, shutdown) after the send was posted, the task still
    matches it, with a recv that discards the data if it was not yet submitted, and
    still releases it, so no isend is left posted."""
    assert src.rank is not None and dst.rank is not None
    tag = src.next_tag()
    abandoned = asyncio.Event()

    async def protocol() -> int:
        n = await src.post_send(tag, src_blocks, dst.rank)  # type: ignore[arg-type]
        try:
            keep = None if abandoned.is_set() else dst_blocks
            await dst.recv_blocks(keep, src.rank, tag, len(src_blocks))  # type: ignore[arg-type]
        finally:
            await src.finish_send(tag)
        return n

    task = asyncio.create_task(protocol(), name=f"kv-p2p-{src.name}-{tag}")
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        abandoned.set()
        task.add_done_callback(_log_abandoned)
        raise


def _log_abandoned(task: asyncio.Task[int]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("an abandoned KV transfer failed: %s", task.exception())


async def _copy_in_process(
    src: LocalExecutor, src_blocks: list[int], dst: LocalExecutor, dst_blocks: list[int]
) -> int:
    """Tensor copy between two workers of this process, holding both workers' locks
    (taken in a fixed order) so no step runs on either meanwhile."""

    def copy() -> int:
        return dst.worker.cache.copy_from(src.worker.cache.blocks, src_blocks, dst_blocks)

    first, second = sorted((src, dst), key=id)
    async with first.lock:
        if second is first:
            return await asyncio.to_thread(copy)
        async with second.lock:
            return await asyncio.to_thread(copy)
