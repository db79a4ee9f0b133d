"""Build a model and fill its weights from a resolved source."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from distserve.model.base import CausalLM
from distserve.model.config import ModelConfig
from distserve.model.metadata import config_of, hf_tokenizer
from distserve.model.registry import ModelSource
from distserve.model.tokenizer import Tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    tokenizer: Tokenizer


def model_class(arch: str) -> type[CausalLM]:
    if arch == "llama":
        from distserve.model.llama import LlamaForCausalLM

        return LlamaForCausalLM
    if arch == "opt":
        from distserve.model.opt import OPTForCausalLM

        return OPTForCausalLM
    if arch == "gpt2":
        from distserve.model.gpt2 import GPT2LMHeadModel

        return GPT2LMHeadModel
    raise ValueError(f"unknown arch {arch!r}")


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device) -> CausalLM:
    """An uninitialized model on `device` in `dtype`, built without touching memory twice:
    constructed on the meta device, then materialized once."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_class(cfg.arch)(cfg)
    finally:
        torch.set_default_dtype(old)
    model = model.to_empty(device=device)
    for m in model.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()
    return model.eval().requires_grad_(False)


def init_random_(model: CausalLM, seed: int = 0) -> None:
    """Deterministic random weights: N(0, 0.02) matrices, unit norms, zero biases."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        elif name.endswith("bias"):
            p.data.zero_()
        else:
            p.data.fill_(1.0)


def safetensors_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors files")
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, st.get_tensor(name)


def load(
    source: ModelSource, dtype: str = "bfloat16", device: str = "cpu", seed: int = 0
) -> LoadedModel:
    """Build the model of `source` with its weights and tokenizer."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tdtype = DTYPES[dtype]
    if source.format == "gguf":
        from distserve.model.gguf_file import GGUFModelFile

        assert source.path is not None
        gf = GGUFModelFile(source.path)
        model = build_model(gf.config, tdtype, device)
        model.load_weights(gf.weights())
        model.pack_weights()
        return LoadedModel(model, gf.config, Tokenizer.from_gguf_metadata(gf.tokenizer_metadata()))
    if source.format == "hf":
        assert source.path is not None
        cfg = config_of(source)
        model = build_model(cfg, tdtype, device)
        model.load_weights(safetensors_weights(source.path))
        model.pack_weights()
        return LoadedModel(model, cfg, hf_tokenizer(source.path, cfg))
    if source.format == "random":
        cfg = source.config or config_of(source)
        model = build_model(cfg, tdtype, device)
        init_random_(model, seed)
        model.pack_weights()
        return LoadedModel(model, cfg, Tokenizer.bytes_only(cfg.vocab_size, cfg.eos_token_id))
    raise ValueError(f"unknown model format {source.format!r}")
