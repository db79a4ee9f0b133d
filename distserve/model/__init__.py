"""Model definitions (Llama family, OPT, GPT-2), their layers and weight loaders.

Importing this package is cheap and torch-free (`ModelConfig`, the registry); model
classes and loaders import torch when they are used."""

from distserve.model.config import ModelConfig

__all__ = ["ModelConfig"]
