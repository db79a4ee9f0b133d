"""The executor side of one instance: model, KV cache and runner in one process.

A `Worker` holds no request state; the controller's scheduler sends it plans. It runs
in-process (tests, the offline engine) or as a Ray actor that owns its cores.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distserve.config import EngineConfig
from distserve.core import StepPlan, StepResult
from distserve.model.config import ModelConfig
from distserve.model.loader import DTYPES, LoadedModel, load
from distserve.model.parallel import (
    Shard,
    TensorGroup,
    check_parallel,
    local_config,
    split_model,
)
from distserve.model.registry import resolve
from distserve.runtime.kv_store import gather_writes, to_numpy
from distserve.runtime.worker.kernel_choice import choose_kernel_rows
from distserve.runtime.worker.kv_cache import KVCache, block_view, map_shared, num_blocks_for
from distserve.runtime.worker.model_runner import ModelRunner
from distserve.runtime.worker.p2p import P2PEndpoint
from distserve.runtime.worker.synthetic import SyntheticPlans
from distserve.runtime.worker.threads import pin_to_cores


@dataclass(frozen=True)
class WorkerInfo:
    """What the controller needs to know about a started worker."""

    num_blocks: int
    block_size: int
    bytes_per_block: int
    model_config: ModelConfig
    cores: tuple[int, ...]
    pid: int
    load_seconds: float
    node: str
    """Where the worker runs (Ray node id, or host name)."""
    shm_path: str | None = None
    """Its cache file under /dev/shm, for same-node peers to map (until unlinked)."""
    cache_shape: tuple[int, ...] = ()
    num_swap_blocks: int = 0
    kernel_rows: int | None = None
    """Up to how many rows per step it takes the packed kernels, chosen at start
    (`kernel_choice.py`); None: no packed kernels here."""


class Worker:
    """Loads the model, allocates the KV cache once, executes plans, moves KV blocks."""

    def __init__(
        self,
        config: EngineConfig,
        cores: list[int] | None = None,
        loaded: LoadedModel | None = None,
        shared_cache: bool = False,
        shard: Shard | None = None,
        store: str | dist.Store | None = None,
    ) -> None:
        """`shard`: this worker's part of a tensor/pipeline-parallel instance, whose
        tensor ranks meet at `store` (a FileStore path, or a store object in-process)."""
        t0 = time.perf_counter()
        shard = shard or Shard()
        used = pin_to_cores(cores) if config.device == "cpu" else []
        if loaded is None:
            source = resolve(config.model, config.load_format)
            loaded = load(source, config.dtype, config.device, config.seed)
        self.loaded, self.shard = loaded, shard
        cc, dtype, mcfg = config.cache, DTYPES[config.dtype], loaded.config
        check_parallel(mcfg, shard.tp_size, shard.pp_size)
        if shard.tp_size > 1:
            group = TensorGroup(
                _store(store, shard), shard.tp_rank, shard.tp_size, torch.device(config.device),
                GROUP_TIMEOUT,
            )  # fmt: skip
            split_model(loaded.model, shard, group)
        elif shard.pp_size > 1:
            split_model(loaded.model, shard, None)
        local = local_config(mcfg, shard)
        # every stage sizes its blocks like the first (most layers): same block ids everywhere
        widest = local_config(mcfg, dataclasses.replace(shard, pp_rank=0))
        num_blocks = cc.num_blocks or num_blocks_for(widest, cc.kv_cache_gb, cc.block_size, dtype)
        shm = "/dev/shm" if shared_cache and os.path.isdir("/dev/shm") else None
        # a pipeline's stages serve pp slots (runtime/parallel_executor.py): swap for each
        swap = cc.num_swap_blocks * shard.pp_size
        self.cache = KVCache(local, num_blocks, cc.block_size, dtype, config.device, swap, shm)
        self.runner = ModelRunner(loaded.model, self.cache, config.seed)
        kernel_rows = None
        # the timed choice runs steps on this worker alone: ranks would wait for each other
        if loaded.model.has_packed_kernels() and not shard.parallel:
            plans = SyntheticPlans(num_blocks, cc.block_size, mcfg.vocab_size, config.seed)
            limits = loaded.model.row_limits
            kernel_rows, _ = choose_kernel_rows(self.runner.execute, plans, limits)
        self.peers: dict[str, torch.Tensor] = {}
        # A Ray actor runs two calls at once (a transfer beside a step); transfers share
        # staging buffers and the process group, so they take turns.
        self._transfer_lock = threading.Lock()
        self.device = torch.device(config.device)
        self.p2p: P2PEndpoint | None = None
        """Membership in the KV process group, once the controller asks to join."""
        self.info_ = WorkerInfo(
            num_blocks=num_blocks,
            block_size=cc.block_size,
            bytes_per_block=self.cache.bytes_per_block,
            model_config=mcfg,
            cores=tuple(used),
            pid=os.getpid(),
            load_seconds=time.perf_counter() - t0,
            node=_node_id(),
            shm_path=self.cache.shm_path,
            cache_shape=self.cache.shape,
            num_swap_blocks=swap,
            kernel_rows=kernel_rows,
        )

    def info(self) -> WorkerInfo:
        return self.info_

    def ping(self) -> int:
        return os.getpid()

    def execute(self, plan: StepPlan, hidden: np.ndarray[Any, Any] | None = None) -> Any:
        """A step's result; a pipeline stage before the last returns the hidden states it
        hands on (numpy, bf16 viewed as int16: they move through Ray's object store) and
        a later stage takes them as `hidden`."""
        h = None if hidden is None else self._tensor(hidden)
        out = self.runner.execute_stage(plan, h)
        if isinstance(out, StepResult):
            return out
        out = out.cpu()
        return out.view(torch.int16).numpy() if out.dtype == torch.bfloat16 else out.numpy()

    def _tensor(self, data: np.ndarray[Any, Any]) -> torch.Tensor:
        with warnings.catch_warnings():  # object-store arrays are read-only; we only read them
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(np.ascontiguousarray(data))
        if self.cache.dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t.to(self.device)

    def read_blocks(self, block_ids: list[int]) -> np.ndarray[Any, Any]:
        """The KV of some blocks as a numpy array (bf16 viewed as int16: numpy has no bf16,
        and numpy arrays move through Ray's object store ~10x faster than tensors)."""
        return to_numpy(self.cache.read_blocks(block_ids))

    # ---- shared-memory migration (same node) -------------------------------------------
    def attach_peer(self, name: str, path: str, shape: tuple[int, ...]) -> None:
        """Map another worker's cache file so `pull_from_peer` can copy from it."""
        self.peers[name] = block_view(map_shared(path, shape, self.cache.dtype))

    def unlink_shared(self) -> None:
        self.cache.unlink_shared()

    def attach_store(self, path: str, shape: tuple[int, ...]) -> None:
        """Map the KV store's slots (runtime/kv_store.py): plans write into it, and
        `pull_from_peer(STORE_PEER, ...)` reads from it."""
        self.peers[STORE_PEER] = block_view(map_shared(path, shape, self.cache.dtype))
        self.runner.store = self.peers[STORE_PEER]

    def execute_relayed(
        self, plan: StepPlan, reads: np.ndarray[Any, Any] | None
    ) -> tuple[Any, np.ndarray[Any, Any] | None]:
        """A step of a worker that cannot map the KV store (another node than the
        controller's; runtime/kv_store.py StoreRelay): `reads` holds the store slots the
        plan reads, copied in before the forward; the KV the plan writes to the store
        comes back with the result, packed by `gather_writes`."""
        if plan.store_reads:
            assert reads is not None
            self.write_blocks([b for _, b in plan.store_reads], reads)
        out = self.execute(dataclasses.replace(plan, store_reads=(), store_writes=()))
        if not plan.store_writes:
            return out, None
        packed = gather_writes(self.cache.blocks, plan.store_writes, self.cache.block_size)
        return out, to_numpy(packed)

    def use_store(self, slots: torch.Tensor) -> None:
        """The KV store's slots of this process (an in-process worker)."""
        self.peers[STORE_PEER] = slots
        self.runner.store = slots

    def pull_from_peer(self, name: str, src_blocks: list[int], dst_blocks: list[int]) -> int:
        """Copy blocks of a mapped peer cache straight into ours."""
        with self._transfer_lock:
            return self.cache.copy_from(self.peers[name], src_blocks, dst_blocks)

    def write_blocks(self, block_ids: list[int], data: np.ndarray[Any, Any]) -> int:
        """Store blocks read by another worker's `read_blocks`; returns bytes written."""
        t = self._tensor(data)
        with self._transfer_lock:
            self.cache.write_blocks(block_ids, t)
        return int(t.numel() * t.element_size())

    # ---- torch.distributed point-to-point migration ------------------------------------
    def join_group(
        self, address: str, port: int, rank: int, world_size: int, backend: str, timeout: float
    ) -> int:
        """Join the KV process group (all workers call this concurrently); returns rank."""
        if self.p2p is not None:
            raise RuntimeError(f"already rank {self.p2p.rank} of a KV process group")
        self.p2p = P2PEndpoint(
            address, port, rank, world_size, backend, timeout, self.device, self.cache.dtype
        )
        return rank

    def post_send(self, tag: int, block_ids: list[int], dst_rank: int) -> int:
        """Gather blocks into one tensor and post a non-blocking send of it to `dst_rank`
        under `tag`; returns at once with the bytes posted (see p2p.py)."""
        with self._transfer_lock:
            return self._endpoint().post_send(tag, self.cache.read_blocks(block_ids), dst_rank)

    def recv_blocks(
        self, block_ids: list[int] | None, src_rank: int, tag: int, num_blocks: int
    ) -> int:
        """Receive `num_blocks` blocks that `src_rank` posted under `tag` and store them
        in `block_ids`; with None, receive and discard them (an abandoned migration whose
        send must still be matched). Returns the bytes received."""
        if block_ids is not None and len(block_ids) != num_blocks:
            raise ValueError(f"{len(block_ids)} block ids for {num_blocks} blocks")
        rows, _, cols = self.cache.blocks.shape
        with self._transfer_lock:
            data = self._endpoint().recv((rows, num_blocks, cols), src_rank, tag)
            if block_ids is not None:
                self.cache.write_blocks(block_ids, data)
            return int(data.numel() * data.element_size())

    def finish_send(self, tag: int) -> bool:
        """Drop a posted send once its recv has returned; False if the send failed."""
        with self._transfer_lock:
            return self._endpoint().finish_send(tag)

    def num_sends_in_flight(self) -> int:
        """Sends posted and not yet finished (0 when every transfer has been closed)."""
        return len(self.p2p.pending) if self.p2p is not None else 0

    def leave_group(self) -> None:
        if self.p2p is not None:
            self.p2p.close()
            self.p2p = None

    def _endpoint(self) -> P2PEndpoint:
        if self.p2p is None:
            raise RuntimeError("this worker has not joined a KV process group")
        return self.p2p


STORE_PEER = "kv-store"
"""The name the KV store's slots go by among a worker's mapped peers."""

GROUP_TIMEOUT = 120.0
"""Seconds a tensor-parallel rank waits for the others (at start, and in a collective:
a dead rank fails its peers' step after this long)."""


def _store(store: str | dist.Store | None, shard: Shard) -> dist.Store:
    if store is None:
        raise ValueError(f"tp={shard.tp_size} needs a store where its ranks meet")
    if isinstance(store, str):  # one file per stage: each stage is its own group
        return dist.FileStore(f"{store}-{shard.pp_rank}", shard.tp_size)
    return dist.PrefixStore(f"stage{shard.pp_rank}", store)


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())
    except ImportError:
        pass
    import socket

    return socket.gethostname()
