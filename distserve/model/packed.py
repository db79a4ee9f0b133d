"""Weights packed once for the compiled bf16 linear kernel (csrc/linear.cpp), and the call
into it. The plain-torch path that each one replaces is `reference()`; tests check the two
against each other.

Packed layout, per tile of 64 output rows of W [N, K] (N padded to a multiple of 64 with
zero rows, K to even with a zero column):

    packed [N/64, K/2, 64, 2]        packed[t, p, c, i] = W[64 t + c, 2 p + i]
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from distserve.model.kernels import bf16_linear_kernels
from distserve.timing import best_time

TILE = 64
NONE, RESIDUAL, SILU_MUL = 0, 1, 2  # epilogues of csrc/linear.cpp


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """W [N, K] -> [ceil(N/64), ceil(K/2), 64, 2] (see the module docstring)."""
    n, k = w.shape
    n_pad, k_half = -(-n // TILE) * TILE, -(-k // 2)
    padded = torch.zeros(n_pad, 2 * k_half, dtype=w.dtype)
    padded[:n, :k] = w
    return padded.view(n_pad // TILE, TILE, k_half, 2).transpose(1, 2).contiguous()


def interleave_gate_up(w: torch.Tensor) -> torch.Tensor:
    """[gate; up] rows [2I, K] -> rows ordered so that each 64-row tile holds 32 gate rows
    then the 32 up rows of the same outputs (the SILU_MUL epilogue's layout)."""
    two_i, k = w.shape
    i = two_i // 2
    i_pad = -(-i // (TILE // 2)) * (TILE // 2)
    halves = torch.zeros(2, i_pad, k, dtype=w.dtype)
    halves[:, :i] = w.view(2, i, k)
    return halves.view(2, i_pad // 32, 32, k).transpose(0, 1).reshape(2 * i_pad, k)


class PackedLinear:
    """A linear layer's weight (and bias) in the kernel's layout, for bf16 on CPU.

    __call__(x [M, K] bf16, residual [M, N] | None) -> [M, N] bf16, rounded as the
    reference rounds: bf16(x W^T + b), then bf16(residual + that) when a residual is given.
    With `silu_mul`, W is [gate; up] and the result is bf16(silu(gate)) * up: [M, N/2].
    `limits`: the row limits of the model it belongs to (a layer of its own without one).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        silu_mul: bool,
        limits: RowLimits | None = None,
    ) -> None:
        assert weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
        assert not (silu_mul and bias is not None), "silu_mul takes no bias"
        self.n, self.k = weight.shape
        self.silu_mul = silu_mul
        self.weight = pack_weight(interleave_gate_up(weight) if silu_mul else weight)
        if silu_mul:  # padded gate/up halves: the kernel's N counts the padding
            self.n = self.weight.shape[0] * TILE
            self.n_out = weight.shape[0] // 2
        self.bias = None if bias is None else bias.float().contiguous()
        kernels = bf16_linear_kernels()
        assert kernels is not None
        self._linear = kernels.linear_bf16
        self.limits = RowLimits() if limits is None else limits

    def max_rows(self, weight: torch.Tensor, residual: bool = False) -> int:
        """Up to how many rows callers take this kernel (`RowLimits.max_rows`)."""
        return self.limits.max_rows(self, weight, residual)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.silu_mul:
            y = self._linear(x, self.weight, self.n, None, None, SILU_MUL)
            return y if y.shape[1] == self.n_out else y[:, : self.n_out]
        if residual is not None:
            return self._linear(x, self.weight, self.n, self.bias, residual, RESIDUAL)  # type: ignore[no-any-return]
        return self._linear(x, self.weight, self.n, self.bias, None, NONE)  # type: ignore[no-any-return]


def can_pack(weight: torch.Tensor) -> bool:
    """Whether the compiled bf16 linear applies to this weight (and was built)."""
    return (
        weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and bf16_linear_kernels() is not None
    )


ROW_PROBES = (1, 2, 4, 8, 16, 32, 64)


class RowLimits:
    """Up to how many rows (tokens) the packed layers of one model take the kernel rather
    than the plain-torch path they replace. One per model (`CausalLM.row_limits`), shared
    by its packed layers so that layers of one shape are probed once; the model's worker
    sets `model_rows` at start (`runtime/worker/kernel_choice.py`)."""

    def __init__(self) -> None:
        self.model_rows: int | None = None
        """One limit for every layer, chosen on whole model steps; None: per-layer probes."""
        self._probed: dict[tuple[tuple[int, ...], bool, bool, int], int] = {}

    def max_rows(self, packed: PackedLinear, weight: torch.Tensor, residual: bool) -> int:
        """The most rows for which `packed` beats the plain-torch path it replaces
        (`weight` is the same layer unpacked; with its epilogue: the residual add, SiLU
        and product) at the current torch thread count: measured once per shape and
        thread count (or DISTSERVE_PACKED_MAX_ROWS, or `model_rows` where set). Callers
        take the kernel up to it and torch above. The kernel streams the weight once per
        call, which wins where the weight read dominates (decode); on a CPU with matrix
        units (Intel AMX) torch's oneDNN path wins as soon as there are rows to fill
        them: measured on a Xeon with AMX, the kernel was 2x slower at 32 rows and 4-9x
        at 128-512, while on an AMD EPYC (AVX512-BF16, no AMX) it won at every size
        profiled. A layer probed alone reads its weight from cache; in a model step every
        weight comes from memory, which favours the kernel: on the Xeon, per-layer probes
        chose 4 rows, while whole SmolLM2 decode steps on one core ran faster with the
        kernels up to 13-14 rows (43 vs 88 ms at 1 row, 65 vs 92 ms at 8, 99 vs 96 ms at
        14)."""
        env = os.environ.get("DISTSERVE_PACKED_MAX_ROWS")
        if env is not None:
            return int(env)
        if self.model_rows is not None:
            return self.model_rows
        key = (tuple(weight.shape), packed.silu_mul, residual, torch.get_num_threads())
        rows = self._probed.get(key)
        if rows is None:
            rows = self._probed[key] = _measure_max_rows(packed, weight, residual)
        return rows


def _measure_max_rows(packed: PackedLinear, weight: torch.Tensor, residual: bool) -> int:
    gen = torch.Generator().manual_seed(0)
    last_win = 0
    for m in ROW_PROBES:
        x = torch.randn(m, weight.shape[1], generator=gen).to(torch.bfloat16)
        r = torch.randn(m, weight.shape[0], generator=gen).to(torch.bfloat16) if residual else None

        def plain() -> torch.Tensor:
            if packed.silu_mul:
                gate, up = F.linear(x, weight).chunk(2, dim=-1)  # noqa: B023
                return F.silu(gate) * up
            return reference(x, weight, None, r)  # noqa: B023

        if best_time(plain, 5) < best_time(lambda: packed(x, r), 5):  # noqa: B023
            return last_win
        last_win = m
    return sys.maxsize  # the kernel won up to the largest probe: take it at every size


def reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """What PackedLinear computes, in plain torch."""
    y = F.linear(x, weight, bias)
    return y if residual is None else residual + y
