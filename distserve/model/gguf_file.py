"""Reading a llama-architecture GGUF file: its config, its dequantized tensors under HF
names, and its tokenizer metadata."""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cached_property
from typing import Any

import numpy as np

from distserve.model.config import ModelConfig
from distserve.model.gguf_reader import GGUFReader

_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hf_name(gguf_name: str) -> str:
    if gguf_name in _NAMES:
        return _NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if not m or m.group(2) not in _BLOCK_NAMES:
        raise KeyError(f"unknown GGUF tensor {gguf_name}")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    llama.cpp stores each head's rows interleaved as (pair, half) for its RoPE kernel;
    HF keeps them as (half, pair): the first half of a head's rows are the 'x1' parts.
    """
    rows = w.shape[0]
    half = rows // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFModelFile:
    """A llama-architecture GGUF file, opened lazily (memory-mapped by `gguf`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.reader = GGUFReader(path)
        arch = self.field("general.architecture")
        if arch != "llama":
            raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (llama only)")

    def field(self, key: str, default: Any = None) -> Any:
        return self.reader.fields.get(key, default)

    @cached_property
    def config(self) -> ModelConfig:
        g = self.field
        heads = int(g("llama.attention.head_count"))
        hidden = int(g("llama.embedding_length"))
        names = {t.name for t in self.reader.tensors}
        tokens = self.reader.fields["tokenizer.ggml.tokens"]
        return ModelConfig(
            arch="llama",
            vocab_size=int(g("llama.vocab_size", len(tokens))),
            hidden_size=hidden,
            num_layers=int(g("llama.block_count")),
            num_heads=heads,
            num_kv_heads=int(g("llama.attention.head_count_kv", heads)),
            intermediate_size=int(g("llama.feed_forward_length")),
            max_position_embeddings=int(g("llama.context_length", 2048)),
            head_dim=int(g("llama.rope.dimension_count", hidden // heads)),
            norm_eps=float(g("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(g("llama.rope.freq_base", 10000.0)),
            tie_word_embeddings="output.weight" not in names,
            bos_token_id=g("tokenizer.ggml.bos_token_id"),
            eos_token_id=g("tokenizer.ggml.eos_token_id"),
            name=str(g("general.name", "")),
        )

    def weights(self) -> Iterator[tuple[str, Any]]:
        """(HF name, float32 torch tensor) for every tensor, dequantized, q/k unpermuted."""
        import torch
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        cfg = self.config
        for t in self.reader.tensors:
            name = hf_name(t.name)
            w = dequantize(t.data, GGMLQuantizationType(t.tensor_type))
            w = w.reshape([int(d) for d in reversed(t.shape)])
            if name.endswith("q_proj.weight"):
                w = unpermute_rope_rows(w, cfg.num_heads)
            elif name.endswith("k_proj.weight"):
                w = unpermute_rope_rows(w, cfg.num_kv_heads)
            yield name, torch.from_numpy(np.require(w, np.float32, ["C", "W"]))

    def tokenizer_metadata(self) -> dict[str, Any]:
        g = self.field
        return {
            "model": g("tokenizer.ggml.model"),
            "pre": g("tokenizer.ggml.pre"),
            "tokens": g("tokenizer.ggml.tokens"),
            "token_types": g("tokenizer.ggml.token_type"),
            "merges": g("tokenizer.ggml.merges"),
            "bos_token_id": g("tokenizer.ggml.bos_token_id"),
            "eos_token_id": g("tokenizer.ggml.eos_token_id"),
            "add_bos_token": bool(g("tokenizer.ggml.add_bos_token", False)),
            "chat_template": g("tokenizer.chat_template"),
        }
