"""The physical paged KV cache of one instance, and its host-side swap space.

Layout: one tensor [layers, 2 (K, V), kv_heads, num_blocks, block_size, head_dim]; a
layer's view merges (num_blocks, block_size) into one slot dimension (see
model/attention.py). The block ids handed out by `core.BlockManager` index dimension 3.
"""

from __future__ import annotations

import torch

from distserve.model.config import ModelConfig


def num_blocks_for(cfg: ModelConfig, gib: float, block_size: int, dtype: torch.dtype) -> int:
    """How many blocks fit in `gib` GiB."""
    per_block = cfg.kv_bytes_per_token(torch.empty(0, dtype=dtype).element_size()) * block_size
    n = int(gib * 2**30) // per_block
    if n < 1:
        raise ValueError(f"{gib} GiB holds no KV block of {per_block} bytes")
    return n


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
    ) -> None:
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        shape = (cfg.num_layers, 2, cfg.num_kv_heads, num_blocks, block_size, cfg.head_dim)
        # zero_() touches every page now: first-touch faults mid-request are costly.
        self.data = torch.empty(shape, dtype=dtype, device=device).zero_()
        layer_shape = (cfg.num_layers, 2, cfg.num_kv_heads, num_blocks * block_size, cfg.head_dim)
        self.layers = list(self.data.view(layer_shape).unbind(0))  # [2, kvh, slots, d] each
        swap_shape = (
            cfg.num_layers,
            2,
            cfg.num_kv_heads,
            num_swap_blocks,
            block_size,
            cfg.head_dim,
        )
        pin = torch.device(device).type == "cuda"
        self.swap = (
            torch.zeros(swap_shape, dtype=dtype, pin_memory=pin) if num_swap_blocks else None
        )

    @property
    def bytes_per_block(self) -> int:
        return self.data[:, :, :, 0].numel() * self.data.element_size()

    def copy_blocks(self, pairs: tuple[tuple[int, int], ...]) -> None:
        """Device block -> device block copies (copy-on-write)."""
        if pairs:
            src, dst = _index(pairs, self.data.device)
            self.data[:, :, :, dst] = self.data[:, :, :, src]

    def swap_out(self, pairs: tuple[tuple[int, int], ...]) -> None:
        """(device block, host block) copies."""
        if pairs:
            assert self.swap is not None, "swap_out without swap space"
            dev, host = _index(pairs, "cpu")
            self.swap[:, :, :, host] = self.data[:, :, :, dev.to(self.data.device)].to("cpu")

    def swap_in(self, pairs: tuple[tuple[int, int], ...]) -> None:
        """(host block, device block) copies."""
        if pairs:
            assert self.swap is not None, "swap_in without swap space"
            host, dev = _index(pairs, "cpu")
            self.data[:, :, :, dev.to(self.data.device)] = self.swap[:, :, :, host].to(
                self.data.device
            )

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A contiguous copy [layers, 2, kv_heads, n, block_size, d] of some blocks (migration)."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.data.device)
        return self.data.index_select(3, idx)

    def write_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        """Store blocks read by `read_blocks` (possibly of another instance) into ours."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.data.device)
        self.data.index_copy_(3, idx, blocks.to(self.data.device, self.dtype))


def _index(
    pairs: tuple[tuple[int, int], ...], device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tensor(pairs, dtype=torch.long, device=device)
    return t[:, 0], t[:, 1]
