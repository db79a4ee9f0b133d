"""The KV process group, the controller's side: the rendezvous every worker joins when
migrations go over torch.distributed point-to-point (gloo on CPU, NCCL on GPU).

The controller owns the group's TCPStore: it listens on a port the OS picks (no port is
hard-coded, and none is picked first and bound later by someone else), on this node;
workers reach it at 127.0.0.1 when they all run on this node, else at this node's
address. Rank i is executors[i]. The store lives as long as the `KVProcessGroup`; each
worker leaves the group when its executor closes (`RayExecutor.close`). Across nodes,
gloo picks each worker's network interface from its host name; set GLOO_SOCKET_IFNAME
(NCCL_SOCKET_IFNAME) in the workers' environment to choose another.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Any

from distserve.runtime.executor import Executor, RayExecutor
from distserve.runtime.worker.worker import WorkerInfo

log = logging.getLogger(__name__)


class KVProcessGroup:
    """A joined group: its store (owned here) and its members' executors (by rank)."""

    def __init__(self, store: Any, address: str, members: list[RayExecutor], backend: str) -> None:
        self.store, self.address, self.backend = store, address, backend
        self.members = members

    @property
    def port(self) -> int:
        return int(self.store.port)

    def close(self) -> None:
        """Drop the store (after the workers have left, or died)."""
        self.store = None


async def join_process_group(
    executors: list[Executor], infos: list[WorkerInfo], backend: str, timeout: float
) -> KVProcessGroup:
    """Host a TCPStore, then have every worker join the group concurrently (each call
    blocks until all have joined). Raises TimeoutError if they have not within `timeout`
    seconds; `timeout` is also the group's timeout for every transfer."""
    import torch.distributed as dist

    members = [e for e in executors if isinstance(e, RayExecutor)]
    if len(members) != len(executors):
        raise ValueError("a KV process group needs every worker to be a Ray actor")
    address = _store_address(infos)
    td = datetime.timedelta(seconds=timeout)
    store = dist.TCPStore(
        address, 0, len(members), is_master=True, timeout=td, wait_for_workers=False
    )
    joins = [
        e.join_group(address, store.port, rank, len(members), backend, timeout)
        for rank, e in enumerate(members)
    ]
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*joins)
    except asyncio.TimeoutError:
        raise TimeoutError(
            f"workers did not join the {backend} process group at {address}:{store.port} "
            f"within {timeout:.0f} s"
        ) from None
    log.info("%d workers joined the %s KV group at %s:%d", len(members), backend, address,
             store.port)  # fmt: skip
    return KVProcessGroup(store, address, members, backend)


def _store_address(infos: list[WorkerInfo]) -> str:
    """127.0.0.1 if every worker runs on this node, else this node's address."""
    import ray

    if not ray.is_initialized():
        return "127.0.0.1"
    here = ray.get_runtime_context().get_node_id()
    if all(info.node == here for info in infos):
        return "127.0.0.1"
    return str(ray.util.get_node_ip_address())
