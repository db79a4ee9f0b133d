"""Step and transfer times from a profile: what the simulator's executor returns
instead of running a model."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from distserve.core.plan import StepPlan
from distserve.model.registry import ARCHITECTURES
from distserve.sim.profile import Profile
from distserve.sim.serving_path import ServingPath


@dataclass(frozen=True)
class LatencyModel:
    """The time of one step of one instance, and of one KV migration into it: a profile
    and the serving path it runs on.

    A step's prompt chunks cost the profile's prefill formula, its decode tokens the
    decode formula; a mixed step (chunked prefill) pays the fixed term once. A prompt
    chunk that starts at position s > 0 attends to s earlier tokens: its quadratic term
    is (s + l)^2 - s^2 instead of l^2. The serving path scales that model time and adds
    its per-request and per-step costs (`ServingPath`)."""

    profile: Profile
    path: ServingPath = ServingPath()
    kv_bytes_per_token: int = 0

    @property
    def contended(self) -> bool:
        return self.path.contended

    @property
    def transfer_bandwidth(self) -> float:
        """Bytes per second of KV migration: the serving path's, else the profile's,
        else 10 GB/s."""
        if self.path.transfer_bandwidth is not None:
            return self.path.transfer_bandwidth
        return float(self.profile.fit.get("transfer_bandwidth", 1e10))

    def step_time(self, plan: StepPlan, busy_share: float = 0.0) -> float:
        prefill: list[tuple[int, int]] = []
        decode: list[int] = []
        for ch in plan.chunks:  # one pass, as plan.prefill_chunks / decode_chunks split them
            if ch.start == 0 or ch.num_tokens > 1:
                prefill.append((ch.start, ch.num_tokens))
            else:
                decode.append(ch.start)
        return self.phase_time(prefill, decode, busy_share)

    def phase_time(
        self, prefill: Sequence[tuple[int, int]], decode: Sequence[int], busy_share: float = 0.0
    ) -> float:
        """The time of one step of these prompt chunks ((start, tokens) each) and decode
        contexts (what `step_time` charges a plan; core/routing.py's per-request rule asks
        it of steps not planned yet)."""
        if not (prefill or decode):
            return 0.0
        p, d = step_parts(self.profile, prefill, decode)
        p_scale, d_scale = self.path.factors(busy_share)
        extra = self.path.decode_seq_time * max(0, len(decode) - 1)
        return p_scale * p + d_scale * d + extra + self.path.step_overhead

    def decode_steps_time(self, contexts: list[int], steps: int, busy_share: float = 0.0) -> float:
        """Total time of `steps` consecutive decode steps of the same batch, contexts
        growing by one each step: the formula is linear in the summed context."""
        return self.decode_clock(contexts, busy_share)(steps)

    def decode_clock(self, contexts: list[int], busy_share: float = 0.0) -> Callable[[int], float]:
        """`decode_steps_time(contexts, steps, busy_share)` as a function of `steps`, each
        call O(1): when the steps of a span start (the simulator asks it often)."""
        if not contexts:
            return lambda steps: 0.0
        batch = len(contexts)
        a, b, c = (
            self.profile.decode_large
            if batch >= self.profile.decode_threshold
            else self.profile.decode_small
        )
        base = sum(n + 1 for n in contexts)
        scale = self.path.factors(busy_share)[1]
        seq, overhead = self.path.decode_seq_time, self.path.step_overhead

        def elapsed(steps: int) -> float:
            if steps <= 0:
                return 0.0
            model = steps * (a + c * batch) + b * (steps * base + batch * steps * (steps - 1) // 2)
            extra = steps * seq * (batch - 1)
            return model * scale + extra + steps * overhead

        return elapsed

    def min_decode_step_time(self, batch: int, busy_share: float = 0.0) -> float:
        """A lower bound of `decode_steps_time(contexts, 1, busy_share)` over every
        `contexts` of `batch` requests (each context at least 0), without looking at them:
        -inf where the formula is not monotone in the context (a negative coefficient)."""
        if batch <= 0:
            return 0.0
        a, b, c = (
            self.profile.decode_large
            if batch >= self.profile.decode_threshold
            else self.profile.decode_small
        )
        scale = self.path.factors(busy_share)[1]
        if b < 0 or scale < 0:
            return -math.inf
        model = a + c * batch + b * batch  # each context n contributes n + 1 >= 1
        low = model * scale + self.path.decode_seq_time * (batch - 1) + self.path.step_overhead
        return low - 1e-9 * abs(low)  # below the exact sum's rounding too

    def transfer_time(self, num_tokens: int) -> float:
        return (
            self.path.transfer_overhead
            + num_tokens * self.kv_bytes_per_token / self.transfer_bandwidth
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


def kv_bytes_per_token(profile: Profile) -> int:
    """KV bytes one token takes: the profile's record of it, else its architecture's at
    2 bytes per element, else 0 (no migration cost)."""
    if "kv_bytes_per_token" in profile.fit:
        return int(profile.fit["kv_bytes_per_token"])
    arch = ARCHITECTURES.get(profile.model)
    return arch.kv_bytes_per_token(2) if arch is not None else 0


def latency_model(profile: Profile, path: ServingPath) -> LatencyModel:
    """The latency model of an instance with this profile on this serving path."""
    return LatencyModel(profile, path, kv_bytes_per_token(profile))
