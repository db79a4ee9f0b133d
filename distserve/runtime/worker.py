"""The executor side of one instance: model, KV cache and runner in one process.

A `Worker` holds no request state; the controller's scheduler sends it plans. It runs
in-process (tests, the offline engine) or as a Ray actor that owns its cores.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distserve.config import EngineConfig
from distserve.core import StepPlan, StepResult
from distserve.model.config import ModelConfig
from distserve.model.loader import DTYPES, LoadedModel, load
from distserve.model.registry import resolve
from distserve.runtime.kv_cache import KVCache, block_view, map_shared, num_blocks_for
from distserve.runtime.model_runner import ModelRunner
from distserve.runtime.threads import pin_to_cores


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


class Worker:
    """Loads the model, allocates the KV cache once, executes plans, moves KV blocks."""

    def __init__(
        self,
        config: EngineConfig,
        cores: list[int] | None = None,
        loaded: LoadedModel | None = None,
        shared_cache: bool = False,
    ) -> None:
        t0 = time.perf_counter()
        used = pin_to_cores(cores) if config.device == "cpu" else []
        if loaded is None:
            source = resolve(config.model, config.load_format)
            loaded = load(source, config.dtype, config.device, config.seed)
        self.loaded = loaded
        cc, dtype, mcfg = config.cache, DTYPES[config.dtype], loaded.config
        num_blocks = cc.num_blocks or num_blocks_for(mcfg, cc.kv_cache_gb, cc.block_size, dtype)
        shm = "/dev/shm" if shared_cache and os.path.isdir("/dev/shm") else None
        self.cache = KVCache(
            mcfg, num_blocks, cc.block_size, dtype, config.device, cc.num_swap_blocks, shm
        )
        self.runner = ModelRunner(loaded.model, self.cache, config.seed)
        self.peers: dict[str, torch.Tensor] = {}
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
        )

    def info(self) -> WorkerInfo:
        return self.info_

    def ping(self) -> int:
        return os.getpid()

    def execute(self, plan: StepPlan) -> StepResult:
        return self.runner.execute(plan)

    def read_blocks(self, block_ids: list[int]) -> np.ndarray[Any, Any]:
        """The KV of some blocks as a numpy array (bf16 viewed as int16: numpy has no bf16,
        and numpy arrays move through Ray's object store ~10x faster than tensors)."""
        t = self.cache.read_blocks(block_ids).cpu()
        return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()  # type: ignore[no-any-return]

    # ---- shared-memory migration (same node) -------------------------------------------
    def attach_peer(self, name: str, path: str, shape: tuple[int, ...]) -> None:
        """Map another worker's cache file so `pull_from_peer` can copy from it."""
        self.peers[name] = block_view(map_shared(path, shape, self.cache.dtype))

    def unlink_shared(self) -> None:
        self.cache.unlink_shared()

    def pull_from_peer(self, name: str, src_blocks: list[int], dst_blocks: list[int]) -> int:
        """Copy blocks of a mapped peer cache into ours (one gather, one scatter)."""
        src = torch.tensor(src_blocks, dtype=torch.long)
        data = self.peers[name].index_select(1, src)
        self.cache.write_blocks(dst_blocks, data)
        return int(data.numel() * data.element_size())

    def write_blocks(self, block_ids: list[int], data: np.ndarray[Any, Any]) -> int:
        """Store blocks read by another worker's `read_blocks`; returns bytes written."""
        with warnings.catch_warnings():  # object-store arrays are read-only; we only read them
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(np.ascontiguousarray(data))
        if self.cache.dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        self.cache.write_blocks(block_ids, t)
        return int(t.numel() * t.element_size())


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())
    except ImportError:
        pass
    import socket

    return socket.gethostname()
