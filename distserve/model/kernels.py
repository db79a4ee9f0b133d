"""Optional compiled kernels (C++, built on first use with torch's extension builder and
cached). Everything they do has a plain-torch reference path in model/attention.py; when
a kernel cannot build, a warning says why and the reference path is used.

Set DISTSERVE_KERNELS=0 to use the reference paths only.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import Any

log = logging.getLogger(__name__)
_SRC = os.path.join(os.path.dirname(__file__), "csrc")


@functools.cache
def cpu_kernels() -> Any | None:
    """The compiled CPU kernels module, or None (disabled or failed to build)."""
    if os.environ.get("DISTSERVE_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="distserve_cpu_kernels",
            sources=[os.path.join(_SRC, "paged_attention.cpp")],
            extra_cflags=["-O3", "-march=native", "-ffast-math"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, unsupported CPU flags, ...
        warnings.warn(
            f"distserve: compiled CPU kernels unavailable, using plain torch ({e})", stacklevel=2
        )
        return None


def build() -> None:
    """Build (or find cached) kernels now; for setup scripts."""
    mod = cpu_kernels()
    print("distserve kernels:", "ready" if mod is not None else "unavailable (plain torch paths)")


if __name__ == "__main__":
    build()
