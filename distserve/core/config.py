"""Configuration of the KV cache and the schedulers: frozen, validated, torch-free."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class PreemptionMode(str, enum.Enum):
    RECOMPUTE = "recompute"
    """Free the victim's blocks; its KV is recomputed from prompt + outputs later."""
    SWAP = "swap"
    """Copy the victim's blocks to host swap space and back when blocks free up."""


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache of one instance."""

    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    num_blocks: int | None = field(
        default=None, metadata={"help": "KV blocks; None: as many as kv_cache_gb allows"}
    )
    kv_cache_gb: float = field(
        default=1.0, metadata={"help": "memory for the KV cache when num_blocks is None (GiB)"}
    )
    num_swap_blocks: int = field(
        default=0, metadata={"help": "host blocks for swap preemption (0: no swap space)"}
    )
    watermark: float = field(
        default=0.01, metadata={"help": "share of blocks kept free when admitting new requests"}
    )
    prefix_caching: bool = field(
        default=True,
        metadata={
            "help": "keep computed full blocks named by their prefix and reuse them for "
            "requests that share it; freed ones stay cached until their memory is needed"
        },
    )

    def __post_init__(self) -> None:
        if not isinstance(self.prefix_caching, bool):
            raise ValueError(f"prefix_caching must be a bool, got {self.prefix_caching!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not self.kv_cache_gb > 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if self.num_swap_blocks < 0:
            raise ValueError(f"num_swap_blocks must be >= 0, got {self.num_swap_blocks}")
        if not 0.0 <= self.watermark < 0.5:
            raise ValueError(f"watermark must be in [0, 0.5), got {self.watermark}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits and policies of one instance's scheduler."""

    max_num_seqs: int = field(default=64, metadata={"help": "most requests in one step"})
    max_num_batched_tokens: int = field(
        default=2048, metadata={"help": "most tokens computed in one step (the token budget)"}
    )
    max_model_len: int = field(
        default=2048, metadata={"help": "longest prompt + output a request may reach"}
    )
    chunked_prefill: bool = field(
        default=False,
        metadata={"help": "colocated only: mix decode tokens and prompt chunks in one budget"},
    )
    preemption_mode: PreemptionMode = field(
        default=PreemptionMode.RECOMPUTE,
        metadata={"help": "what to do with a victim when blocks run out"},
    )
    max_migration_hold: float = field(
        default=0.5,
        metadata={
            "help": "prefill only: stop admitting prompts while requests awaiting migration "
            "hold more than this share of the blocks (back-pressure)"
        },
    )
    max_pending_migrations: int = field(
        default=64, metadata={"help": "decode only: most requests queued for admission"}
    )

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "max_num_batched_tokens must be >= max_model_len without chunked prefill "
                f"(a whole prompt runs in one step), got {self.max_num_batched_tokens} < "
                f"{self.max_model_len}"
            )
        object.__setattr__(self, "preemption_mode", PreemptionMode(self.preemption_mode))
        if not 0.0 < self.max_migration_hold <= 1.0:
            raise ValueError(f"max_migration_hold must be in (0, 1], got {self.max_migration_hold}")
        if self.max_pending_migrations < 1:
            raise ValueError(
                f"max_pending_migrations must be >= 1, got {self.max_pending_migrations}"
            )
