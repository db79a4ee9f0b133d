"""The configuration of one engine instance, gathered from the per-concern dataclasses.
Torch-free; written as JSON beside every benchmark output."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from distserve.core.config import CacheConfig, SchedulerConfig
from distserve.model.registry import DEFAULT_MODEL, LOAD_FORMATS

DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class EngineConfig:
    """Everything needed to build one instance: model, numerics, cache and scheduler."""

    model: str = field(
        default=DEFAULT_MODEL, metadata={"help": "registered name, HF dir or .gguf file"}
    )
    load_format: str = field(
        default="auto", metadata={"help": "auto (the files' weights) or random"}
    )
    dtype: str = field(
        default="bfloat16", metadata={"help": "weights, activations and KV cache dtype"}
    )
    device: str = field(default="cpu", metadata={"help": "torch device: cpu or cuda[:n]"})
    cores: tuple[int, ...] | None = field(
        default=None, metadata={"help": "CPU cores to pin to (None: all)"}
    )
    seed: int = field(
        default=0, metadata={"help": "seed of random weights and of unseeded sampling"}
    )
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:n]', got {self.device!r}")
        if self.cores is not None:
            object.__setattr__(self, "cores", tuple(self.cores))

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, enum.Enum):
        return x.value
    return x
