"""Response bodies and stream chunks in the OpenAI shapes."""

from __future__ import annotations

import json
import time
from typing import Any

from distserve.runtime.outputs import RequestOutput


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens`: prompt tokens served by the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def timings(out: RequestOutput) -> dict[str, float]:
    """Per-request milestones in seconds after arrival (an extension field, `metrics`)."""
    t0 = out.timestamps.get("arrived", 0.0)
    return {k: round(v - t0, 6) for k, v in out.timestamps.items()}


def completion_logprobs(
    out: RequestOutput, tokenizer: Any, new_only: bool
) -> dict[str, Any] | None:
    lps = out.new_logprobs if new_only else out.logprobs
    if lps is None:
        return None
    decode = lambda t: tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
    return {
        "tokens": [decode(lp.token_id) for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{decode(t): v for t, v in lp.top} for lp in lps],
        "text_offset": [],
    }


def chat_logprobs(out: RequestOutput, tokenizer: Any, new_only: bool) -> dict[str, Any] | None:
    lps = out.new_logprobs if new_only else out.logprobs
    if lps is None:
        return None

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}
            for lp in lps
        ]
    }


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class Envelope:
    """id / created / model shared by a response and all of its chunks."""

    def __init__(self, prefix: str, request_id: str, model: str) -> None:
        self.id, self.created, self.model = f"{prefix}-{request_id}", int(time.time()), model

    def body(self, obj: str, **fields: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            **fields,
        }
