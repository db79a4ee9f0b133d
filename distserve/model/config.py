"""The shape of a model: enough to build it, size its KV cache and estimate its cost.
Torch-free, so the planner and the simulator can read it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

ARCHS = ("llama", "opt", "gpt2")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, named the same way for every family."""

    arch: str = field(metadata={"help": "model family: llama, opt or gpt2"})
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    head_dim: int = 0
    """0: hidden_size // num_heads."""
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    """HF-style rope scaling: {"rope_type": "linear"|"llama3", "factor": ..., ...}."""
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """Llama: biases on q/k/v/o (OPT and GPT-2 always have them)."""
    activation: str = "silu"
    word_embed_proj_dim: int = 0
    """OPT: embedding width when it differs from hidden_size (OPT-350m); 0: same."""
    layer_norm_before: bool = True
    """OPT: pre-norm (all but OPT-350m)."""
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.word_embed_proj_dim == 0:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        mlp = 3 * h * i if self.arch == "llama" else 2 * h * i
        layer = h * (q + 2 * kv) + q * h + mlp
        emb = v * self.word_embed_proj_dim * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "") -> ModelConfig:
        """From a HF `config.json` (model_type llama/mistral, opt, gpt2)."""
        mt = hf.get("model_type", "")
        if mt in ("llama", "mistral"):
            heads = hf["num_attention_heads"]
            return cls(
                arch="llama",
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=hf.get("num_key_value_heads") or heads,
                intermediate_size=hf["intermediate_size"],
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                head_dim=hf.get("head_dim") or 0,
                norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=_rope_theta(hf),
                rope_scaling=_rope_scaling(hf),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                attention_bias=hf.get("attention_bias", False),
                activation=hf.get("hidden_act", "silu"),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=_first(hf.get("eos_token_id")),
                name=name,
            )
        if mt == "opt":
            return cls(
                arch="opt",
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"],
                num_kv_heads=hf["num_attention_heads"],
                intermediate_size=hf["ffn_dim"],
                max_position_embeddings=hf["max_position_embeddings"],
                tie_word_embeddings=hf.get("tie_word_embeddings", True),
                activation=hf.get("activation_function", "relu"),
                word_embed_proj_dim=hf.get("word_embed_proj_dim") or 0,
                layer_norm_before=hf.get("do_layer_norm_before", True),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=_first(hf.get("eos_token_id")),
                name=name,
            )
        if mt == "gpt2":
            h = hf["n_embd"]
            return cls(
                arch="gpt2",
                vocab_size=hf["vocab_size"],
                hidden_size=h,
                num_layers=hf["n_layer"],
                num_heads=hf["n_head"],
                num_kv_heads=hf["n_head"],
                intermediate_size=hf.get("n_inner") or 4 * h,
                max_position_embeddings=hf["n_positions"],
                norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                tie_word_embeddings=True,
                activation=hf.get("activation_function", "gelu_new"),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=_first(hf.get("eos_token_id")),
                name=name,
            )
        raise ValueError(f"unsupported model_type {mt!r} (supported: llama, mistral, opt, gpt2)")


def _first(v: Any) -> Any:
    return v[0] if isinstance(v, list) and v else v


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    return float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    rs = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type") or "default"
    if kind == "default":
        return None
    return {k: v for k, v in rs.items() if k != "type"} | {"rope_type": kind}
