"""What a model is without its weights: its config and tokenizer. Torch-free, for the API
server, the benchmark client and the planner."""

from __future__ import annotations

import json
import os

from distserve.model.config import ModelConfig
from distserve.model.registry import ModelSource, resolve
from distserve.model.tokenizer import Tokenizer


def load_tokenizer(source: ModelSource) -> tuple[ModelConfig, Tokenizer]:
    """The config and tokenizer of a model without its weights (for the API server)."""
    if source.format == "random":
        cfg = source.config or config_of(source)
        return cfg, Tokenizer.bytes_only(cfg.vocab_size, cfg.eos_token_id)
    assert source.path is not None
    if source.format == "gguf":
        from distserve.model.gguf_file import GGUFModelFile

        gf = GGUFModelFile(source.path)
        return gf.config, Tokenizer.from_gguf_metadata(gf.tokenizer_metadata())
    cfg = config_of(source)
    return cfg, hf_tokenizer(source.path, cfg)


def tokenizer_for(model: str) -> Tokenizer:
    """The tokenizer that measures prompt lengths: the served model's own (a registered
    name, a HF directory or a .gguf file)."""
    try:
        return load_tokenizer(resolve(model))[1]
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(
            f"cannot load the tokenizer of {model!r} ({e}); pass --model with a registered "
            "name, a HF directory or a .gguf file"
        ) from None


def config_of(source: ModelSource) -> ModelConfig:
    assert source.path is not None
    if source.path.endswith(".gguf"):
        from distserve.model.gguf_file import GGUFModelFile

        return GGUFModelFile(source.path).config
    with open(os.path.join(source.path, "config.json"), encoding="utf-8") as f:
        return ModelConfig.from_hf(json.load(f), name=source.name)


def hf_tokenizer(path: str, cfg: ModelConfig) -> Tokenizer:
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return Tokenizer.from_hf_dir(path)
    return Tokenizer.bytes_only(cfg.vocab_size, cfg.eos_token_id)
