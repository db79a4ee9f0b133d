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
DTYPE_CHOICES = ("auto", *DTYPES)
_FAST_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16). Without it
    torch's CPU bf16 matmul is emulated: measured on an AVX2-only EPYC (Zen 3), 1 GFLOP/s
    against 60 for float32. No /proc/cpuinfo (not Linux): False."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return any(flag in flags for flag in _FAST_BF16_CPU_FLAGS)
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """`auto`: bfloat16 on CUDA and on CPUs with native bf16 (half the memory, and on
    AVX512-BF16 2.6x float32's prefill speed), float32 on other CPUs. Else as given."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda") or cpu_has_fast_bf16():
        return "bfloat16"
    return "float32"


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
        default="auto",
        metadata={"help": "weights, activations and KV cache dtype; auto: see resolve_dtype"},
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
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, self.device))
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:n]', got {self.device!r}")
        if self.cores is not None:
            object.__setattr__(self, "cores", tuple(self.cores))

    @property
    def prefix_cache_key(self) -> str:
        """The namespace of this engine's cached prefixes: equal tokens under another
        model, other weights or another dtype never name the same KV block."""
        weights = f"random-{self.seed}" if self.load_format == "random" else "auto"
        return f"{self.model}|{weights}|{self.dtype}"

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))


MODES = ("disagg", "colocated")

TRANSPORTS = ("auto", "shm", "object-store", "gloo", "nccl")
"""How KV migrates between Ray workers (runtime/transport.py): auto (shared memory between
workers on one node, else the Ray object store), or one of them for every migration; gloo
and nccl are torch.distributed point-to-point on CPU and GPU."""


@dataclass(frozen=True)
class PlacementConfig:
    """How many instances of each role run, and what each owns."""

    mode: str = field(
        default="disagg", metadata={"help": "disagg (prefill + decode instances) or colocated"}
    )
    num_prefill: int = field(default=1, metadata={"help": "disagg: prefill instances"})
    num_decode: int = field(default=1, metadata={"help": "disagg: decode instances"})
    num_instances: int = field(default=2, metadata={"help": "colocated: instances"})
    chunked_prefill: bool = field(
        default=False, metadata={"help": "colocated: Sarathi-style chunked prefill"}
    )
    cores_per_instance: int | None = field(
        default=None,
        metadata={"help": "CPU cores each instance owns (None: share the machine's evenly)"},
    )
    prefill_kv_cache_gb: float | None = field(
        default=None,
        metadata={"help": "disagg: KV cache GiB of each prefill instance (None: the engine's)"},
    )
    decode_kv_cache_gb: float | None = field(
        default=None,
        metadata={"help": "disagg: KV cache GiB of each decode instance (None: the engine's)"},
    )
    prefill_tp: int = field(
        default=1, metadata={"help": "tensor parallel degree of prefill (and colocated) instances"}
    )
    prefill_pp: int = field(
        default=1,
        metadata={"help": "pipeline parallel degree of prefill (and colocated) instances"},
    )
    decode_tp: int = field(
        default=1, metadata={"help": "tensor parallel degree of decode instances"}
    )
    decode_pp: int = field(
        default=1, metadata={"help": "pipeline parallel degree of decode instances"}
    )
    emulated: bool = field(
        default=False, metadata={"help": "instances run on emulated devices (serve --emulate)"}
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("num_prefill", "num_decode", "num_instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cores_per_instance is not None and self.cores_per_instance < 1:
            raise ValueError(f"cores_per_instance must be >= 1, got {self.cores_per_instance}")
        for name in ("prefill_kv_cache_gb", "decode_kv_cache_gb"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        if self.chunked_prefill and self.mode != "colocated":
            raise ValueError("chunked_prefill applies to colocated mode only")
        degrees = (self.prefill_tp, self.prefill_pp, self.decode_tp, self.decode_pp)
        if any(d < 1 for d in degrees):
            raise ValueError(f"parallel degrees must be >= 1, got {degrees}")

    @property
    def groups(self) -> list[tuple[str, int, int]]:
        """(role, tp, pp) of each instance in start order: its pp slots are the next pp
        entries of `roles`."""
        if self.mode == "colocated":
            return [("colocated", self.prefill_tp, self.prefill_pp)] * self.num_instances
        return [("prefill", self.prefill_tp, self.prefill_pp)] * self.num_prefill + [
            ("decode", self.decode_tp, self.decode_pp)
        ] * self.num_decode

    def shape(self, role: str) -> tuple[int, int]:
        """(tp, pp) of an instance of `role`; colocated instances take the prefill fields."""
        if role == "decode":
            return self.decode_tp, self.decode_pp
        return self.prefill_tp, self.prefill_pp

    @property
    def roles(self) -> list[str]:
        """The role of each instance, in start order. An instance of pp pipeline stages
        counts pp times: it runs as pp virtual instances of its role, as the planner
        models a pipeline (design note 6; runtime/parallel_executor.py)."""
        if self.mode == "colocated":
            return ["colocated"] * self.num_instances * self.prefill_pp
        return ["prefill"] * self.num_prefill * self.prefill_pp + [
            "decode"
        ] * self.num_decode * self.decode_pp


NVLINK_BANDWIDTH = 300e9
"""Bytes/s one way between two A100-SXM GPUs of a node (NVLink 3: 600 GB/s both ways),
the paper's testbed."""
CROSS_NODE_BANDWIDTH = 25e9 / 8
"""Bytes/s between nodes of the paper's testbed (25 Gbps)."""


@dataclass(frozen=True)
class EmulationConfig:
    """Emulated devices (`serve --emulate`): every instance is a worker that does no math
    but keeps the profile's KV capacity, spends the latency model's time on each step and
    samples from a fixed token stream; its KV migrates at a link's bandwidth."""

    profile: str = field(
        default="a100",
        metadata={"help": "latency profiles: a100, a100-vllm (bundled) or a profile JSON file"},
    )
    tokenizer: str = field(
        default="smollm2-135m",
        metadata={"help": "model whose tokenizer measures prompts, or 'bytes' (one per byte)"},
    )
    num_nodes: int = field(default=1, metadata={"help": "emulated nodes"})
    devices_per_node: int = field(default=8, metadata={"help": "emulated devices per node"})
    intra_node_bandwidth: float = field(
        default=NVLINK_BANDWIDTH, metadata={"help": "KV migration bytes/s within a node"}
    )
    inter_node_bandwidth: float = field(
        default=CROSS_NODE_BANDWIDTH, metadata={"help": "KV migration bytes/s across nodes"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the emulated token stream"})

    def __post_init__(self) -> None:
        for name in ("num_nodes", "devices_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("intra_node_bandwidth", "inter_node_bandwidth"):
            v = getattr(self, name)
            if not 0 < v < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {v}")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, enum.Enum):
        return x.value
    return x
