"""The physical paged KV cache of one instance, and its host-side swap space.

Layout: one tensor [layers, 2 (K, V), kv_heads, num_blocks, block_size, head_dim].

- A layer's view merges (num_blocks, block_size) into one slot dimension:
  [2, kv_heads, slots, head_dim] (see model/attention.py).
- The block view merges everything but the block id: [layers*2*kv_heads, num_blocks,
  block_size*head_dim]. Block copies (migration, swap, copy-on-write) index its middle
  dimension: 3-D index_select runs at memory speed, where indexing dimension 3 of the 6-D
  tensor is orders of magnitude slower on CPU.

On CPU the cache may live in a file under /dev/shm, so that a decode worker on the same
node can map a prefill worker's cache and copy blocks straight out of it.
"""

from __future__ import annotations

import math
import os
import uuid

import torch

from distserve.model.config import ModelConfig


def num_blocks_for(cfg: ModelConfig, gib: float, block_size: int, dtype: torch.dtype) -> int:
    """How many blocks fit in `gib` GiB."""
    per_block = cfg.kv_bytes_per_token(torch.empty(0, dtype=dtype).element_size()) * block_size
    n = int(gib * 2**30) // per_block
    if n < 1:
        raise ValueError(f"{gib} GiB holds no KV block of {per_block} bytes")
    return n


def cache_shape(cfg: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    return (cfg.num_layers, 2, cfg.num_kv_heads, num_blocks, block_size, cfg.head_dim)


def map_shared(path: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Map a cache file (our own or a peer's) as a tensor of `shape`."""
    return torch.from_file(path, shared=True, size=math.prod(shape), dtype=dtype).view(shape)


def block_view(data: torch.Tensor) -> torch.Tensor:
    """[layers*2*kv_heads, num_blocks, block_size*head_dim] view of a 6-D cache tensor."""
    layers, two, kvh, nb, bs, d = data.shape
    return data.view(layers * two * kvh, nb, bs * d)


class KVCache:
    """Device blocks plus optional host swap blocks, allocated (and touched) once."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: str | torch.device,
        num_swap_blocks: int = 0,
        shm_dir: str | None = None,
    ) -> None:
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.shape = cache_shape(cfg, num_blocks, block_size)
        self.shm_path: str | None = None
        if shm_dir is not None and torch.device(device).type == "cpu":
            # named after the worker's pid: the reaper removes a killed worker's file by it
            # (cluster/reaper.py)
            self.shm_path = os.path.join(
                shm_dir, f"distserve-kv-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            )
            self.data = map_shared(self.shm_path, self.shape, dtype)
        else:
            self.data = torch.empty(self.shape, dtype=dtype, device=device)
        # Touch every page now: first-touch faults in the middle of a request are costly.
        self.data.zero_()
        layer_shape = (cfg.num_layers, 2, cfg.num_kv_heads, num_blocks * block_size, cfg.head_dim)
        self.layers = list(self.data.view(layer_shape).unbind(0))  # [2, kvh, slots, d] each
        self.blocks = block_view(self.data)
        self._staging = torch.empty(0, dtype=dtype, device=device)
        pin = torch.device(device).type == "cuda"
        swap_shape = cache_shape(cfg, num_swap_blocks, block_size)
        self.swap = (
            block_view(torch.zeros(swap_shape, dtype=dtype, pin_memory=pin))
            if num_swap_blocks
            else None
        )

    @property
    def bytes_per_block(self) -> int:
        return self.blocks[:, 0].numel() * self.data.element_size()

    def unlink_shared(self) -> None:
        """Remove the /dev/shm name; the memory lives on while anyone maps it."""
        if self.shm_path and os.path.exists(self.shm_path):
            os.unlink(self.shm_path)

    def copy_blocks(self, pairs: tuple[tuple[int, int], ...]) -> None:
        """Device block -> device block copies (copy-on-write)."""
        if pairs:
            src, dst = _index(pairs, self.data.device)
            self.blocks.index_copy_(1, dst, self.blocks.index_select(1, src))

    def swap_out(self, pairs: tuple[tuple[int, int], ...]) -> None:
        """(device block, host block) copies."""
        if pairs:
            assert self.swap is not None, "swap_out without swap space"
            dev, host = _index(pairs, "cpu")
            self.swap.index_copy_(
                1, host, self.blocks.index_select(1, dev.to(self.data.device)).cpu()
            )

    def swap_in(self, pairs: tuple[tuple[int, int], ...]) -> None:
        """(host block, device block) copies."""
        if pairs:
            assert self.swap is not None, "swap_in without swap space"
            host, dev = _index(pairs, "cpu")
            data = self.swap.index_select(1, host).to(self.data.device)
            self.blocks.index_copy_(1, dev.to(self.data.device), data)

    def copy_from(self, source: torch.Tensor, src_blocks: list[int], dst_blocks: list[int]) -> int:
        """Copy blocks of another cache's block view (a mapped peer, or a cache in this
        process) into ours: one gather into a staging buffer kept for reuse (fresh pages
        would cost more than the copy), one scatter. Two native calls, so a copy running
        beside a step in another thread does not queue for the GIL block by block."""
        n = len(src_blocks)
        if n != len(dst_blocks):
            raise ValueError(f"{n} source blocks for {len(dst_blocks)} destination blocks")
        rows, _, width = self.blocks.shape
        if self._staging.numel() < rows * n * width:
            self._staging = torch.empty(rows * n * width, dtype=self.dtype, device=self.data.device)
        staging = self._staging[: rows * n * width].view(rows, n, width)
        src = torch.tensor(src_blocks, dtype=torch.long, device=source.device)
        torch.index_select(source, 1, src, out=staging)
        dst = torch.tensor(dst_blocks, dtype=torch.long, device=self.data.device)
        self.blocks.index_copy_(1, dst, staging)
        return n * self.bytes_per_block

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A contiguous copy [layers*2*kv_heads, n, block_size*head_dim] of some blocks."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.data.device)
        return self.blocks.index_select(1, idx)

    def write_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        """Store blocks read by `read_blocks` (possibly of another instance) into ours."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.data.device)
        self.blocks.index_copy_(1, idx, blocks.to(self.data.device, self.dtype))


def _index(
    pairs: tuple[tuple[int, int], ...], device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tensor(pairs, dtype=torch.long, device=device)
    return t[:, 0], t[:, 1]
