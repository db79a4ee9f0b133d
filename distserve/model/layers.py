"""Small building blocks shared by the model families."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distserve.model import packed as packing
from distserve.model.kernels import bf16_linear_kernels
from distserve.model.packed import PackedLinear, RowLimits


def embedding(num: int, dim: int) -> nn.Embedding:
    """An nn.Embedding without its random init (the weights are loaded next): its
    `normal_` on the meta device imports torch._dynamo, ~1-1.5 s of every worker's start."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalize in float32, scale in the input dtype (as HF does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dtype == self.weight.dtype == torch.bfloat16
            and x.dim() == 2
            and x.device.type == "cpu"
        ):
            kernels = bf16_linear_kernels()
            if kernels is not None:
                return kernels.rms_norm_bf16(x, self.weight, self.eps)  # type: ignore[no-any-return]
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear with a fast path: once `pack()`ed, bf16 inputs on CPU go through the
    compiled kernel over a packed copy of the weight (model/packed.py); otherwise, or after
    `pack(False)`, the plain-torch reference.

    forward(x [T, in] with contiguous rows, residual [T, out] | None) -> [T, out]:
    x W^T + b, plus the residual when given (fused into the kernel's epilogue).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.packed: PackedLinear | None = None

    def pack(self, fast: bool = True, limits: RowLimits | None = None) -> None:
        """(Re)build the packed copy from the current weight, or drop it (fast=False).
        `limits`: the model's row limits (`PackedLinear`)."""
        ok = fast and packing.can_pack(self.weight)
        self.packed = PackedLinear(self.weight, self.bias, False, limits) if ok else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if (
            self.packed is not None
            and x.dtype == torch.bfloat16
            and x.shape[0] <= self.packed.max_rows(self.weight, residual is not None)
        ):
            return self.packed(x, residual)
        return packing.reference(x, self.weight, self.bias, residual)


class GateUpProj(Linear):
    """The fused [gate; up] projection of a gated MLP: x [T, h] -> act(gate) * up [T, I].
    Its fast path (SiLU only) fuses the activation and the product into the kernel."""

    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__(hidden, 2 * intermediate, bias=False)
        self.act_name, self.act = act, activation(act)

    def pack(self, fast: bool = True, limits: RowLimits | None = None) -> None:
        ok = fast and self.act_name == "silu" and packing.can_pack(self.weight)
        self.packed = PackedLinear(self.weight, None, True, limits) if ok else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        assert residual is None
        if (
            self.packed is not None
            and x.dtype == torch.bfloat16
            and x.shape[0] <= self.packed.max_rows(self.weight)
        ):
            return self.packed(x)
        gate, up = F.linear(x, self.weight).chunk(2, dim=-1)
        return self.act(gate) * up  # type: ignore[no-any-return]


def activation(name: str) -> Any:
    """The HF activation names our families use."""
    table = {
        "silu": F.silu,
        "relu": F.relu,
        "gelu": F.gelu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r} (supported: {sorted(table)})")
    return table[name]


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], with linear or Llama-3 scaling applied."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv
    kind = scaling["rope_type"]
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        old_len = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling {kind!r} (supported: linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the rotate-half layout (HF Llama), with cos/sin
    precomputed for every position once."""

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta, self.scaling = (
            head_dim,
            max_positions,
            theta,
            scaling,
        )
        self.register_buffer(
            "cos", torch.empty(0, dtype=torch.float32), persistent=False
        )  # [max_pos, d/2] float32
        self.register_buffer("sin", torch.empty(0, dtype=torch.float32), persistent=False)
        if self.cos.device.type != "meta":  # on meta, the loader calls it once materialized
            self.reset_buffers()  # (computed there, it would import torch._dynamo: ~1 s)

    def reset_buffers(self) -> None:
        """(Re)compute cos/sin in float32 on the buffers' device: the loader calls this
        after materializing a model that was built on the meta device."""
        device = self.cos.device
        inv = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(device)
        pos = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = pos[:, None] * inv[None, :]
        self.cos = freqs.cos()
        self.sin = freqs.sin()

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotate each x [T, heads, d] by the angles of its token's position."""
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, d/2]
        sin = self.sin[positions].unsqueeze(1)
        out = []
        for x in xs:
            c, s = cos.to(x.dtype), sin.to(x.dtype)
            x1, x2 = x.chunk(2, dim=-1)
            out.append(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1))
        return tuple(out)
