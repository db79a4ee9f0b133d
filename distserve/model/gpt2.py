"""GPT-2: learned positions, LayerNorm, fused QKV stored as transposed Conv1D weights,
tanh-GELU MLP, tied embeddings."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from distserve.model.attention import AttentionMetadata, BiasedMHA
from distserve.model.base import CausalLM, WeightTarget
from distserve.model.config import ModelConfig
from distserve.model.layers import activation, embedding

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Layer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = BiasedMHA(cfg.hidden_size, cfg.num_heads)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(
        self, x: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, meta)
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(CausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Layer(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        hidden: torch.Tensor | None = None,
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        if hidden is not None:
            raise ValueError("GPT-2 runs unsplit: no pipeline stages")
        x = self.wte(input_ids) + self.wpe(positions)
        for i, (layer, cache) in enumerate(zip(self.h, kv_caches, strict=True)):
            x = layer(x, cache, meta)
            if on_layer is not None:
                on_layer(i)
        return self.ln_f(x)

    def lm_head_weight(self) -> torch.Tensor:
        return self.wte.weight

    def map_weight(self, hf_name: str) -> WeightTarget | None:
        name = hf_name.removeprefix("transformer.")
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            return None
        return name.replace("attn.c_attn.", "attn.qkv_proj.").replace(
            "attn.c_proj.", "attn.o_proj."
        ), None

    def prepare_weight(self, hf_name: str, w: torch.Tensor) -> torch.Tensor:
        # HF's Conv1D stores [in, out]; a Linear wants [out, in].
        return w.t() if hf_name.endswith(_CONV1D) else w
