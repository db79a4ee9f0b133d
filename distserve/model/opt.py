"""OPT (the DistServe paper's models): learned positions (offset 2), LayerNorm,
biases everywhere, ReLU MLP; OPT-350m's post-norm and projected embeddings included."""

from __future__ import annotations

import torch
from torch import nn

from distserve.model.attention import AttentionMetadata, BiasedMHA
from distserve.model.base import CausalLM, WeightTarget
from distserve.model.config import ModelConfig
from distserve.model.layers import activation, embedding

_POSITION_OFFSET = 2  # OPT's position table starts 2 rows in (a fairseq legacy)


class OPTLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.layer_norm_before
        self.self_attn = BiasedMHA(cfg.hidden_size, cfg.num_heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.hidden_size)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size)
        self.act = activation(cfg.activation)

    def forward(
        self, x: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        x = x + self.self_attn(h, cache, meta)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.fc2(self.act(self.fc1(h)))
        return x if self.pre_norm else self.final_layer_norm(x)


class OPTForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        e, h = cfg.word_embed_proj_dim, cfg.hidden_size
        self.embed_tokens = embedding(cfg.vocab_size, e)
        self.embed_positions = embedding(cfg.max_position_embeddings + _POSITION_OFFSET, h)
        self.project_in = nn.Linear(e, h, bias=False) if e != h else None
        self.project_out = nn.Linear(h, e, bias=False) if e != h else None
        self.layers = nn.ModuleList(OPTLayer(cfg) for _ in range(cfg.num_layers))
        self.final_layer_norm = nn.LayerNorm(h) if cfg.layer_norm_before else None
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(e, cfg.vocab_size, bias=False)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        return x + self.embed_positions(positions + _POSITION_OFFSET)  # type: ignore[no-any-return]

    def run_layer(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return layer(x, cache, meta)  # type: ignore[no-any-return]

    def final(self, x: torch.Tensor) -> torch.Tensor:
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return x if self.project_out is None else self.project_out(x)

    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def map_weight(self, hf_name: str) -> WeightTarget | None:
        name = hf_name.removeprefix("model.").removeprefix("decoder.")
        if name == "lm_head.weight" and self.lm_head is None:
            return None
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            if f"self_attn.{proj}." in name:
                return name.replace(proj, "qkv_proj"), i
        return name.replace("self_attn.out_proj", "self_attn.o_proj"), None

    def shard_sizes(self, param_name: str) -> list[int]:
        return [self.config.hidden_size] * 3
