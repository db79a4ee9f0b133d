"""The Llama family (Llama-2/3, SmolLM2, Mistral-style GQA): pre-norm RMSNorm, rotary
positions, grouped-query attention, SwiGLU MLP."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from distserve.model.attention import AttentionMetadata, attend, rotate_and_store
from distserve.model.base import CausalLM, WeightTarget
from distserve.model.config import ModelConfig
from distserve.model.kernels import bf16_linear_kernels
from distserve.model.layers import GateUpProj, Linear, RMSNorm, RotaryEmbedding, embedding


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.sizes = [q, kv, kv]
        self.qkv_proj = Linear(cfg.hidden_size, q + 2 * kv, cfg.attention_bias)
        self.o_proj = Linear(q, cfg.hidden_size, cfg.attention_bias)
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        cache: torch.Tensor,
        meta: AttentionMetadata,
        residual: torch.Tensor,
    ) -> torch.Tensor:
        """x [T, h] (normed) -> residual + attention output [T, h]."""
        qkv = self.qkv_proj(x)  # [T, (heads + 2 kv_heads) d]
        q, k, v = rotate_and_store(
            qkv, positions, rope, cache, meta, self.num_heads, self.num_kv_heads
        )
        o = attend(q, k, v, cache, meta, self.scale)  # [T, heads, d]
        return self.o_proj(o.reshape(x.shape[0], -1), residual)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = GateUpProj(cfg.hidden_size, cfg.intermediate_size, cfg.activation)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x [T, h] (normed) -> residual + MLP output [T, h]."""
        return self.down_proj(self.gate_up_proj(x), residual)


class LlamaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)
        self.fused: Any = None
        """The compiled decode-only path (csrc/llama_layer.cpp), built by `fuse`."""

    def fused_rows(self) -> int:
        """The most decode rows the fused path takes: where every one of its packed
        projections still beats torch's (model/packed.py RowLimits)."""
        attn, mlp = self.self_attn, self.mlp
        return min(
            lin.packed.max_rows(lin.weight, residual)  # type: ignore[union-attr]
            for lin, residual in (
                (attn.qkv_proj, False),
                (attn.o_proj, True),
                (mlp.gate_up_proj, False),
                (mlp.down_proj, True),
            )
        )

    def fuse(self, rope: RotaryEmbedding, fast: bool = True) -> None:
        """Build the compiled decode-only path from the packed weights (after
        `pack_weights`), or drop it. It needs every projection packed and SiLU."""
        attn, mlp = self.self_attn, self.mlp
        if not fast:
            self.fused = None
            return
        packs = (attn.qkv_proj.packed, attn.o_proj.packed, mlp.gate_up_proj.packed)
        unpacked = any(p is None for p in packs) or mlp.down_proj.packed is None
        # (unpacked first: asking for the bf16 kernels warns where they are missing, and a
        # float32 model never needs them)
        kernels = None if unpacked else bf16_linear_kernels()
        if unpacked or kernels is None:
            self.fused = None
            return
        qkv, o, down = attn.qkv_proj.packed, attn.o_proj.packed, mlp.down_proj.packed
        gate_up = mlp.gate_up_proj.packed
        self.fused = kernels.LlamaDecodeLayer(
            self.input_layernorm.weight, qkv.weight, qkv.n, qkv.bias, o.weight, o.n, o.bias,
            self.post_attention_layernorm.weight, gate_up.weight, gate_up.n, gate_up.n_out,
            down.weight, down.n, attn.num_heads, attn.num_kv_heads,
            self.input_layernorm.eps, attn.scale, rope.cos, rope.sin,
        )  # fmt: skip

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if (
            self.fused is not None
            and not meta.prefills
            and x.dtype == torch.bfloat16
            and x.shape[0] <= self.fused_rows()
        ):
            return self.fused.forward(  # type: ignore[no-any-return]
                x, positions, cache, meta.slot_mapping, meta.decode_blocks, meta.decode_lens,
                meta.block_size,
            )  # fmt: skip
        x = self.self_attn(self.input_layernorm(x), positions, rope, cache, meta, residual=x)
        return self.mlp(self.post_attention_layernorm(x), residual=x)


class LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = (
            None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self.rope = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # type: ignore[no-any-return]

    def run_layer(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return layer(x, positions, self.rope, cache, meta)  # type: ignore[no-any-return]

    def final(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)  # type: ignore[no-any-return]

    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def pack_weights(self, fast: bool = True) -> None:
        super().pack_weights(fast)
        for layer in self.layers:  # a tensor-parallel shard all-reduces between ops
            layer.fuse(self.rope, fast and self.tp is None)

    _STACKED = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def map_weight(self, hf_name: str) -> WeightTarget | None:
        name = hf_name.removeprefix("model.")
        if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
            return None
        m = re.fullmatch(r"(layers\.\d+\.(?:self_attn|mlp)\.)(\w+)(\.weight|\.bias)", name)
        if m and m.group(2) in self._STACKED:
            fused, shard = self._STACKED[m.group(2)]
            return m.group(1) + fused + m.group(3), shard
        return name, None

    def shard_sizes(self, param_name: str) -> list[int]:
        if param_name.endswith(("qkv_proj.weight", "qkv_proj.bias")):
            attn = self.layers[0].self_attn
            return list(attn.sizes)
        return [self.config.intermediate_size] * 2
