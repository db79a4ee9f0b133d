"""Step and transfer times from a profile: what the simulator's executor returns
instead of running a model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from distserve.core.plan import StepPlan
from distserve.sim.profile import Profile


@dataclass(frozen=True)
class LatencyModel:
    """The time of one step of one instance, and of one KV migration into it.

    A step's prompt chunks cost the profile's prefill formula, its decode tokens the
    decode formula; a mixed step (chunked prefill) pays the fixed term once. A prompt
    chunk that starts at position s > 0 attends to s earlier tokens: its quadratic term
    is (s + l)^2 - s^2 instead of l^2. `step_overhead` is the per-step time outside the
    model (scheduling, the controller's round trip to the worker); `compute_scale`
    stretches the model's own time (a serving process shares its cores with the API
    server and the load it serves, which the profiler, alone on its core, does not), and
    `decode_scale`, where given, the decode part's alone (a served decode step leaves its
    caches to the round trip between steps; a long prefill hardly notices)."""

    profile: Profile
    step_overhead: float = 0.0
    kv_bytes_per_token: int = 0
    transfer_bandwidth: float = 1e10
    """Bytes per second of KV migration."""
    transfer_overhead: float = 0.0
    """Fixed seconds per migration (round trips)."""
    compute_scale: float = 1.0
    """Model time when serving over model time when profiled."""
    decode_scale: float | None = None
    """The same for decode steps (None: `compute_scale`)."""
    contended_scale: float | None = None
    """Prefill's scale while every other instance on the machine is in a decode step
    (None: no contention). On a CPU the frontend's work for their streamed tokens then
    has no idle core to run on and takes the workers' time; the simulator interpolates by
    the share of the other instances in a decode step when a step starts."""
    contended_decode_scale: float | None = None
    """The same for decode steps (None: no contention)."""
    decode_seq_time: float = 0.0
    """Seconds each decode request of a step adds beyond the first, on top of the scaled
    profile: served steps pay per request more than the profiler's isolated steps show
    (on the EPYC a served decode step of 3 requests ran 1.15-1.3x the profile, of 1
    request 0.95-1.1x; `bench/calibrate.trace_fit` measures it)."""

    @property
    def contended(self) -> bool:
        return self.contended_scale is not None or self.contended_decode_scale is not None

    def factors(self, busy_share: float = 0.0) -> tuple[float, float]:
        """(prefill, decode) scales with `busy_share` of the other instances busy."""
        p = self.compute_scale
        d = self.compute_scale if self.decode_scale is None else self.decode_scale
        if busy_share > 0:
            if self.contended_scale is not None:
                p += (self.contended_scale - p) * busy_share
            if self.contended_decode_scale is not None:
                d += (self.contended_decode_scale - d) * busy_share
        return p, d

    def step_time(self, plan: StepPlan, busy_share: float = 0.0) -> float:
        prefill = [(ch.start, ch.num_tokens) for ch in plan.prefill_chunks]
        decode = [ch.start for ch in plan.decode_chunks]
        if not (prefill or decode):
            return 0.0
        p, d = step_parts(self.profile, prefill, decode)
        p_scale, d_scale = self.factors(busy_share)
        extra = self.decode_seq_time * max(0, len(decode) - 1)
        return p_scale * p + d_scale * d + extra + self.step_overhead

    def decode_steps_time(self, contexts: list[int], steps: int, busy_share: float = 0.0) -> float:
        """Total time of `steps` consecutive decode steps of the same batch, contexts
        growing by one each step: the formula is linear in the summed context."""
        if steps <= 0 or not contexts:
            return 0.0
        batch = len(contexts)
        a, b, c = (
            self.profile.decode_large
            if batch >= self.profile.decode_threshold
            else self.profile.decode_small
        )
        base = sum(n + 1 for n in contexts)
        model = steps * (a + c * batch) + b * (steps * base + batch * steps * (steps - 1) // 2)
        extra = steps * self.decode_seq_time * (batch - 1)
        return model * self.factors(busy_share)[1] + extra + steps * self.step_overhead

    def transfer_time(self, num_tokens: int) -> float:
        return (
            self.transfer_overhead + num_tokens * self.kv_bytes_per_token / self.transfer_bandwidth
        )


def step_parts(
    profile: Profile, prefill: Sequence[tuple[int, int]], decode: Sequence[int]
) -> tuple[float, float]:
    """The profile's time of one step, split into its prompt part and its decode part,
    unscaled: `prefill` holds (start, tokens) of each prompt chunk, `decode` the context of
    each decoding request. A mixed step (chunked prefill) pays one fixed term."""
    p = d = 0.0
    if prefill:
        a, b, c = profile.prefill
        p = a + sum(b * n + c * ((s + n) ** 2 - s**2) for s, n in prefill)
    if decode:
        d = profile.decode_time(decode)
        if prefill:
            large = len(decode) >= profile.decode_threshold
            fixed = (profile.decode_large if large else profile.decode_small)[0]
            d -= min(profile.prefill[0], fixed)
    return p, d
