"""A request from arrival to its last token, and the states it passes through.

Token ranges of a request (P = prompt length, O = outputs so far):

    all_token_ids:  [ prompt 0 .. P-1 | outputs P .. P+O-1 ]
    KV computed:    [ 0 .. num_computed_tokens-1 ]
    still to run:   [ num_computed_tokens .. num_tokens-1 ]   (prompt rest, or the last output)

A decode step computes the KV of the last sampled token and samples the next one. A
prefill with a prefix-cache hit starts at the cached length: the KV of [0, cached) is
shared blocks that another request computed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from distserve.core.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Where a request is. The order is the order of progress."""

    WAITING = 0
    """Queued for prefill, holds no blocks."""
    PREFILLING = 1
    """Holds blocks; its prompt is (partly) computed."""
    AWAITING_MIGRATION = 2
    """Prefill instance: prefill done, first token out, holds its KV until a decode
    instance has pulled it."""
    MIGRATING = 3
    """Decode instance: blocks allocated, KV being pulled from the prefill instance."""
    DECODING = 4
    """Holds blocks; one token per step."""
    SWAPPED = 5
    """Preempted by swapping: its KV sits in host swap blocks until it is swapped back in."""
    FINISHED_STOPPED = 6
    FINISHED_LENGTH = 7
    FINISHED_ABORTED = 8

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


class FinishReason(str, enum.Enum):
    """Why a request ended, spelled as the OpenAI API spells it."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


TIMESTAMP_KEYS = (
    "arrived",
    "prefill_start",
    "prefill_end",
    "migration_start",
    "migration_end",
    "decode_start",
    "decode_end",
    "finished",
)


@dataclass(eq=False)  # identity: two requests are never "equal", and queue lookups stay cheap
class Request:
    """One prompt and its sampling parameters.

    Ownership: a request belongs to exactly one scheduler at a time; only that scheduler
    changes its status, token lists and counters. Timestamps are seconds on whatever clock
    the owner was given (`now`); the first write of each key wins.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    eos_token_id: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[object] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    timestamps: dict[str, float] = field(default_factory=dict)
    num_cached_tokens: int = 0
    """Prompt tokens whose KV a prefix-cache hit supplied at this request's first prefill
    (they were not computed for it); what its usage reports as cached."""

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id}: the prompt has no tokens")
        self.mark("arrived", self.arrival_time)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens at positions [start, end) without building the whole sequence."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def finished(self) -> bool:
        return self.status.finished

    def mark(self, key: str, now: float) -> None:
        """Record the time of a milestone once (a retry does not move the first record)."""
        if key not in TIMESTAMP_KEYS:
            raise KeyError(f"unknown timestamp {key!r}")
        self.timestamps.setdefault(key, now)

    def append_token(self, token_id: int, logprobs: object = None) -> None:
        self.output_token_ids.append(token_id)
        if self.sampling_params.logprobs is not None:
            self.output_logprobs.append(logprobs)

    def append_tokens(self, token_id: int, count: int) -> None:
        """`append_token(token_id)` `count` times (a simulated span of decode steps)."""
        self.output_token_ids.extend([token_id] * count)
        if self.sampling_params.logprobs is not None:
            self.output_logprobs.extend([None] * count)

    def check_stop(self) -> FinishReason | None:
        """The token-level stop rules (stop strings are the detokenizer's business)."""
        outputs = self.output_token_ids
        if not outputs:
            return None
        last = outputs[-1]
        params = self.sampling_params
        if not params.ignore_eos and last == self.eos_token_id:
            return FinishReason.STOP
        if last in params.stop_token_ids:
            return FinishReason.STOP
        if len(outputs) >= params.max_tokens:
            return FinishReason.LENGTH
        return None


def handoff_copy(req: Request) -> Request:
    """The decode side's own copy of a prefilled request, handed over for migration.

    The prefill side keeps its object (and its blocks) until the copy is confirmed, so
    the two must share nothing that either side changes: the output tokens, their
    logprobs and the timestamps are copied; the prompt and the sampling parameters are
    never changed by anyone and are shared. The real controller and the simulator both
    hand off through this function, so they cannot drift apart."""
    return replace(
        req,
        output_token_ids=list(req.output_token_ids),
        output_logprobs=list(req.output_logprobs),
        timestamps=dict(req.timestamps),
    )


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    """Raise ValueError for a prompt that no model of `vocab_size` tokens can run."""
    if not ids:
        raise ValueError("the prompt is empty")
    if any(not 0 <= t < vocab_size for t in ids):
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")


def resume_copy(req: Request) -> Request:
    """A copy of a request whose decode instance died, to hand to another decode instance
    that pulls its KV from the KV store: as a prefilled request (`handoff_copy`) whose KV
    covers every token but the last."""
    again = handoff_copy(req)
    again.status = RequestStatus.AWAITING_MIGRATION
    again.num_computed_tokens = again.num_tokens - 1
    return again
