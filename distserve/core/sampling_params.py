"""Sampling parameters of one request, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Invalid values raise `ValueError` naming the field.

    `temperature == 0` means greedy. With a `seed`, the token sampled at output index `i`
    depends only on (seed, i) and the logits: not on the engine's generator, the batch
    position, or the instance (prefill or decode) that samples it. Identical logits are
    the caller's part: in bf16 a different batch can move them by a rounding step.
    """

    max_tokens: int = 16
    """Most tokens to generate (the first token included)."""
    temperature: float = 1.0
    """Softmax temperature; 0 picks the most likely token (greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 or -1 keeps all."""
    seed: int | None = None
    """Seed for this request's sampling; None draws from the engine's generator."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; the text returned stops before the first match."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (kept in the output ids, like EOS)."""
    ignore_eos: bool = False
    """Keep generating past the EOS token (benchmarks use it to force output lengths)."""
    logprobs: int | None = None
    """Return the sampled token's log-probability and this many top alternatives (0..20)."""
    json_schema: str | None = None
    """Constrain the output to JSON text valid against this JSON schema (the schema as
    JSON text; '{"type": "object"}' is JSON mode). The controller's step loop turns it
    into the tokens allowed at each step (runtime/structured.py)."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Free-form annotations carried with the request (never read by the engine)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(
            _is_int(self.max_tokens) and self.max_tokens >= 1,
            "max_tokens",
            "an integer >= 1",
            self.max_tokens,
        )
        _check(
            _is_num(self.temperature) and 0.0 <= self.temperature <= 100.0,
            "temperature",
            "a number in [0, 100]",
            self.temperature,
        )
        _check(
            _is_num(self.top_p) and 0.0 < self.top_p <= 1.0,
            "top_p",
            "a number in (0, 1]",
            self.top_p,
        )
        _check(
            _is_int(self.top_k) and self.top_k >= -1,
            "top_k",
            "an integer >= -1 (0 or -1: off)",
            self.top_k,
        )
        _check(self.seed is None or _is_int(self.seed), "seed", "an integer or None", self.seed)
        _check(
            all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings", self.stop
        )
        _check(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "token ids >= 0",
            self.stop_token_ids,
        )
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", "a boolean", self.ignore_eos)
        _check(
            self.json_schema is None
            or (isinstance(self.json_schema, str) and self.json_schema != ""),
            "json_schema",
            "a JSON schema as text, or None",
            self.json_schema,
        )
        _check(
            not (self.ignore_eos and self.json_schema),
            "ignore_eos",
            "false with a json_schema (the output ends where the JSON does)",
            self.ignore_eos,
        )
        _check(
            self.logprobs is None
            or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            "logprobs",
            f"an integer in [0, {MAX_LOGPROBS}] or None",
            self.logprobs,
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def effective_top_k(self) -> int:
        """top_k with both 'off' spellings mapped to 0."""
        return 0 if self.top_k <= 0 else self.top_k


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _check(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
