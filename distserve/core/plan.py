"""What a scheduler asks an executor to do in one step, and what comes back.

Small frozen dataclasses of ids and counts, no tensors, so they cross process
boundaries cheaply and the simulator's executor can read the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distserve.core.sampling_params import SamplingParams


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute the KV of tokens [start, start + num_tokens) of one request.

    The chunk attends to the request's cached KV [0, start) plus itself (causally). A
    prompt prefill has start 0; a decode step has one token; a chunked prefill or a
    recompute after preemption has any start.
    """

    request_id: str
    token_ids: tuple[int, ...]
    """Token ids at positions start .. start+n-1."""
    start: int
    """Position of the first token (= the request's computed tokens before this step)."""
    block_table: tuple[int, ...]
    """Physical blocks covering positions 0 .. start+n-1."""
    sampling_params: SamplingParams | None
    """Set when a token is to be sampled after this chunk; None for a non-final prompt chunk."""
    output_index: int = 0
    """Index the sampled token will have among the request's outputs (seeds the sampler)."""
    num_tokens: int = -1
    """Tokens in the chunk: len(token_ids) unless given. Plans for a simulator carry no
    token ids or block tables (nothing there reads them), only this count."""
    allowed_tokens: bytes | None = None
    """The tokens the sampler may pick, as a bitmask (bit i % 8 of byte i // 8: token i;
    tokens past its end are not allowed); None: any. Set by the step loop for a request
    with a JSON schema (runtime/structured.py), never by a scheduler."""

    def __post_init__(self) -> None:
        if self.num_tokens < 0:
            object.__setattr__(self, "num_tokens", len(self.token_ids))

    @classmethod
    def counted(
        cls,
        request_id: str,
        start: int,
        num_tokens: int,
        sampling_params: SamplingParams | None,
        output_index: int,
    ) -> ScheduledChunk:
        """A chunk of counts only (no token ids, no block table), as a simulator's plans
        carry: equal to the constructor's, built ~4x faster (one per request per step)."""
        chunk = object.__new__(cls)
        d = chunk.__dict__  # filled in place, past the frozen __setattr__: the fastest way
        d["request_id"] = request_id
        d["token_ids"] = ()
        d["start"] = start
        d["block_table"] = ()
        d["sampling_params"] = sampling_params
        d["output_index"] = output_index
        d["num_tokens"] = num_tokens
        d["allowed_tokens"] = None
        return chunk

    @property
    def context_len(self) -> int:
        """Tokens whose KV exists after this chunk."""
        return self.start + self.num_tokens

    @property
    def is_prefill(self) -> bool:
        """More than one token, or a first chunk: computed like a prompt."""
        return self.start == 0 or self.num_tokens > 1


@dataclass(frozen=True)
class StepPlan:
    """One step of one instance. An empty plan (no chunks, no copies) means: nothing to do."""

    step_id: int
    chunks: tuple[ScheduledChunk, ...] = ()
    swap_out: tuple[tuple[int, int], ...] = ()
    """(device block, host block) copies to make before the forward pass."""
    swap_in: tuple[tuple[int, int], ...] = ()
    """(host block, device block) copies to make before the forward pass."""
    block_copies: tuple[tuple[int, int], ...] = ()
    """(source, destination) device block copies (copy-on-write)."""
    loads: tuple[tuple[str, int, int], ...] = ()
    """(request id, first block, count): full blocks of a request's table whose KV an
    outside store supplies (the scheduler's `remote_prefix` found them there and counted
    them computed); they are filled before the forward pass (core/kv_store.py turns
    them into `store_reads`)."""
    store_reads: tuple[tuple[int, int], ...] = ()
    """(store slot, device block) copies to make before the forward pass."""
    store_writes: tuple[tuple[int, int, int, int], ...] = ()
    """(device block, store slot, first, end): by the end of the step, copy the KV of token
    offsets [first, end) of the block into the same offsets of a slot of the KV store
    (core/kv_store.py adds these to the scheduler's plan; the scheduler never does). A
    step with prefill chunks copies each layer's rows as that layer finishes."""

    @property
    def empty(self) -> bool:
        return not (self.chunks or self.swap_out or self.swap_in or self.block_copies)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def prefill_chunks(self) -> tuple[ScheduledChunk, ...]:
        return tuple(c for c in self.chunks if c.is_prefill)

    @property
    def decode_chunks(self) -> tuple[ScheduledChunk, ...]:
        return tuple(c for c in self.chunks if not c.is_prefill)


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities at one output position (of the model's raw distribution)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """The most likely tokens and their log-probabilities, best first."""


@dataclass(frozen=True)
class StepResult:
    """What the executor produced for a plan."""

    sampled: dict[str, int] = field(default_factory=dict)
    """request id -> sampled token, for every chunk that had sampling_params."""
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    """request id -> log-probabilities, for requests that asked for them."""
    elapsed: float = 0.0
    """Seconds the executor spent (measured, or the latency model's estimate)."""
