"""The interface every model family implements, and HF-name weight loading."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from distserve.model.attention import AttentionMetadata
from distserve.model.config import ModelConfig
from distserve.model.packed import PackedLinear, RowLimits, can_pack

if TYPE_CHECKING:
    from distserve.model.parallel import TensorGroup

WeightTarget = tuple[str, int | None]
"""(our parameter name, shard index in a fused parameter or None)."""


class CausalLM(nn.Module):
    """A decoder-only language model over a paged KV cache.

    forward(input_ids [T], positions [T], kv_caches [layers x cache], meta) -> hidden [T, h]
    compute_logits(hidden [N, h]) -> logits [N, vocab]

    Fused parameters (q/k/v as one `qkv_proj`, gate/up as one `gate_up_proj`) are filled
    shard by shard from HF names by `load_weights`.
    """

    config: ModelConfig
    layers: nn.ModuleList

    def __init__(self) -> None:
        super().__init__()
        self.lm_head_packed: PackedLinear | None = None
        self.row_limits = RowLimits()
        """Up to how many rows every packed layer of this model takes its kernel."""
        self.tp: TensorGroup | None = None
        """The tensor-parallel group this model is a shard of (model/parallel.py)."""
        self.first_stage = self.last_stage = True
        """Pipeline stage: the first embeds tokens, the last normalizes and has the head."""

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        hidden: torch.Tensor | None = None,
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, h] after this model's layers: from the tokens (first stage)
        or from the previous stage's `hidden`; normalized on the last stage. `on_layer(i)`
        is called once layer i has written its KV into `kv_caches[i]` (a layer-wise KV
        sender, runtime/worker/layerwise.py; on a GPU the write may still be queued)."""
        x = self.embed(input_ids, positions) if hidden is None else hidden
        for i, (layer, cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            x = self.run_layer(layer, x, positions, cache, meta)
            if on_layer is not None:
                on_layer(i)
        return self.final(x) if self.last_stage else x

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_layer(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        raise NotImplementedError

    def final(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def lm_head_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab]; a tensor-parallel shard gathers its vocabulary slice's with
        the other ranks'."""
        if (
            self.lm_head_packed is not None
            and hidden.dtype == torch.bfloat16
            and hidden.shape[0] <= self.lm_head_packed.max_rows(self.lm_head_weight())
        ):
            logits = self.lm_head_packed(hidden.contiguous())
        else:
            logits = F.linear(hidden, self.lm_head_weight())
        if self.tp is None:
            return logits
        return self.tp.all_gather(logits)[:, : self.config.vocab_size]

    def pack_weights(self, fast: bool = True) -> None:
        """Pack weights for the compiled kernels where they apply (bf16 on a CPU with
        AVX512-BF16; elsewhere a no-op), or drop the packed copies (fast=False) so that
        the plain-torch reference paths run. Call again after changing weights."""
        from distserve.model.layers import Linear

        for m in self.modules():
            if isinstance(m, Linear):
                m.pack(fast, self.row_limits)
        w = self.lm_head_weight()
        ok = fast and can_pack(w)
        self.lm_head_packed = PackedLinear(w, None, False, self.row_limits) if ok else None

    def has_packed_kernels(self) -> bool:
        from distserve.model.layers import Linear

        return self.lm_head_packed is not None or any(
            isinstance(m, Linear) and m.packed is not None for m in self.modules()
        )

    # ---- weights ------------------------------------------------------------------
    def map_weight(self, hf_name: str) -> WeightTarget | None:
        """Our parameter (and shard) for a HF checkpoint name; None to skip it."""
        raise NotImplementedError

    def shard_sizes(self, param_name: str) -> list[int]:
        """Row counts of the shards of a fused parameter, in shard order."""
        raise NotImplementedError

    def prepare_weight(self, hf_name: str, w: torch.Tensor) -> torch.Tensor:
        """Family-specific fix-ups of a checkpoint tensor (e.g. GPT-2's transposed Conv1D)."""
        return w

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into our parameters. Raises on a shape mismatch, an
        unknown name, or a parameter left unloaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, w in weights:
            target = self.map_weight(hf_name)
            if target is None:
                continue
            name, shard = target
            if name not in params:
                raise KeyError(f"checkpoint tensor {hf_name} maps to unknown parameter {name}")
            p = params[name].data
            w = self.prepare_weight(hf_name, w)
            if shard is not None:
                sizes = self.shard_sizes(name)
                start = sum(sizes[:shard])
                p = p[start : start + sizes[shard]]
            if tuple(p.shape) != tuple(w.shape):
                raise ValueError(
                    f"{hf_name}: shape {tuple(w.shape)} does not fit {name} {tuple(p.shape)}"
                )
            p.copy_(w)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(missing[:8])}")
