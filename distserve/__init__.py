"""distserve: goodput-optimized LLM serving with disaggregated prefill and decoding.

`import distserve` stays light: the heavy parts (torch, the model) load on first use of
`LLM`. `SamplingParams` is pure Python.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distserve.core.sampling_params import SamplingParams

if TYPE_CHECKING:
    from distserve.llm import LLM, RequestOutput

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("LLM", "RequestOutput"):
        from distserve import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'distserve' has no attribute {name!r}")
