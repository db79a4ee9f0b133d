"""Optional compiled CPU kernels (C++, built on first use with torch's extension builder and
cached under ~/.cache/torch_extensions). This module is the one place that decides whether
they are used; everything they do has a plain-torch reference path beside its caller, which
is used (after a warning that says why) when they cannot be.

- `cpu_kernels()`: the module, or None when disabled or when the build failed. Its decode
  attention is portable C++ (an AVX-512 path where the compiler targets it).
- `bf16_linear_kernels()`: the module when it was also built with AVX512-BF16 (the bf16
  linear layers, RMSNorm and rotary kernels), else None.

Set DISTSERVE_KERNELS=0 to use the reference paths only. `python -m distserve.model.kernels`
builds them ahead of time (the README's setup does).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings
from typing import Any

log = logging.getLogger(__name__)
_SRC = os.path.join(os.path.dirname(__file__), "csrc")
_SOURCES = (
    "module.cpp",
    "paged_attention.cpp",
    "paged_attention_bf16.cpp",
    "linear.cpp",
    "elementwise.cpp",
    "prefill_attention.cpp",
    "llama_layer.cpp",
)


_CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp")


def enabled() -> bool:
    return os.environ.get("DISTSERVE_KERNELS", "1") != "0"


def build_name(torch_version: str) -> str:
    """The extension's name in torch's build cache: keyed by the sources, the flags and the
    torch version, so that two checkouts or environments on one machine keep a build each
    instead of rebuilding over each other's at every switch (35-60 s a build)."""
    digest = hashlib.sha256(torch_version.encode())
    digest.update(" ".join(_CFLAGS).encode())
    for name in (*_SOURCES, "kernels.h", "avx512_exp.h"):
        with open(os.path.join(_SRC, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    return f"distserve_cpu_kernels_{digest.hexdigest()[:16]}"


@functools.cache
def cpu_kernels() -> Any | None:
    """The compiled CPU kernels module, or None (disabled or failed to build)."""
    if not enabled():
        return None
    try:
        import torch
        from torch.utils.cpp_extension import load

        return load(
            name=build_name(torch.__version__),
            sources=[os.path.join(_SRC, f) for f in _SOURCES],
            # OpenMP: without it at::parallel_for in an extension runs on one thread.
            extra_cflags=list(_CFLAGS),
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, unsupported CPU flags, ...
        warnings.warn(
            f"distserve: compiled CPU kernels unavailable, using plain torch ({e})", stacklevel=2
        )
        return None


@functools.cache
def bf16_linear_kernels() -> Any | None:
    """The kernels module if it has the AVX512-BF16 kernels (this CPU supports them and the
    compiler targeted them), else None, with a warning when the reason is the CPU."""
    mod = cpu_kernels()
    if mod is None:
        return None
    if not mod.has_avx512_bf16():
        warnings.warn(
            "distserve: this CPU (or compiler) lacks AVX512-BF16; bf16 linear layers use "
            "plain torch",
            stacklevel=2,
        )
        return None
    return mod


def build() -> None:
    """Build (or find cached) kernels now; for setup scripts."""
    mod = cpu_kernels()
    if mod is None:
        print("distserve kernels: unavailable (plain torch paths)")
    else:
        bf16 = "with" if bf16_linear_kernels() is not None else "without"
        print(f"distserve kernels: ready ({bf16} AVX512-BF16 linear layers)")


if __name__ == "__main__":
    build()
