"""Adaptive re-planning's policy, shared by the real controller (cluster/adaptive.py) and
the simulator (sim/simulator.py, `simulate --adaptive`): which layouts of n instances
exist, how each is predicted on a window of requests (the simulator replays those that
arrived in it, finished or not, and those still queued, a little faster than they came:
`AdaptiveConfig.load`), when a better one is switched to
(a margin and a dwell time: hysteresis), and in which order roles flip on the way there
(one at a time, never leaving a role's requests with no instance to take them). A
colocated instance may run chunked prefill: a layout counts those apart ("chunked"), and
turning chunking on or off is a switch of the scheduler's policy in place
(ColocatedScheduler.reconfigure), not a flip that drains.
Torch-free, so the simulator runs it too."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import TYPE_CHECKING

from distserve.config import PlacementConfig
from distserve.core.config import SchedulerConfig
from distserve.workload.spec import Workload, WorkloadRequest

if TYPE_CHECKING:
    from distserve.sim.profile import Profile
    from distserve.sim.serving_path import ServingPath

Layout = tuple[int, int, int, int]
"""(prefill, decode, colocated, chunked) instance counts: chunked instances are colocated
ones with chunked prefill."""

KINDS = ("prefill", "decode", "colocated", "chunked")
"""The order of a layout's counts."""


def _role(r: object) -> str:
    """A role's name, from a string or the runtime's Role enum."""
    return str(getattr(r, "value", r))


def kind_of(role: object, chunked: bool) -> str:
    """What a layout counts an instance of `role` as, with chunked prefill or not."""
    role = _role(role)
    return "chunked" if role == "colocated" and chunked else role


def role_of(kind: str) -> str:
    """The role of an instance a layout counts as `kind`."""
    return "colocated" if kind == "chunked" else kind


def chunked_scheduler(base: SchedulerConfig, chunk: int) -> SchedulerConfig:
    """A colocated instance's scheduler, `base` with chunked prefill of `chunk` tokens a
    step (the policy a chunked instance of a layout switches to)."""
    return replace(base, chunked_prefill=True, max_num_batched_tokens=chunk)


@dataclass(frozen=True)
class AdaptiveConfig:
    """When and how the layout follows the traffic (serve --adaptive, simulate --adaptive)."""

    profile: str = field(metadata={"help": "latency profile JSON of this deployment's instances"})
    ttft_slo: float = field(metadata={"help": "TTFT target (s) the layouts are compared on"})
    tpot_slo: float = field(metadata={"help": "TPOT target (s) the layouts are compared on"})
    interval: float = field(default=20.0, metadata={"help": "seconds between re-plans"})
    margin: float = field(
        default=0.05, metadata={"help": "attainment gain a new layout must predict (0.05 = 5 pts)"}
    )
    dwell: float = field(
        default=30.0, metadata={"help": "seconds a better layout must stay best before a flip"}
    )
    min_requests: int = field(
        default=20, metadata={"help": "requests the window needs before a re-plan"}
    )
    max_requests: int = field(
        default=400, metadata={"help": "the latest requests a re-plan replays, at most"}
    )
    chunk: int = field(
        default=512,
        metadata={
            "help": "token budget a step of colocated instances with chunked prefill, a "
            "layout re-plans may choose (0: never chunked)"
        },
    )
    load: float = field(
        default=1.2,
        metadata={
            "help": "the multiple of the window's arrival rate the layouts are predicted at "
            "(1: as it came): a layout that meets the targets only at the edge of its "
            "capacity is judged by the collapse a little more load brings"
        },
    )

    step_overhead: float | None = field(
        default=None,
        metadata={
            "help": "seconds outside the model each step of the predicted layouts takes "
            "(None: the deployment's: measured by the controller from its steps, or the "
            "serving path a simulated deployment runs on)"
        },
    )

    def __post_init__(self) -> None:
        for name in ("ttft_slo", "tpot_slo", "interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.margin < 0 or self.dwell < 0 or self.min_requests < 1 or self.chunk < 0:
            raise ValueError("margin, dwell and chunk must be >= 0, min_requests >= 1")
        if not self.load >= 1:
            raise ValueError(f"load must be >= 1, got {self.load}")
        if self.step_overhead is not None and not self.step_overhead >= 0:
            raise ValueError(f"step_overhead must be >= 0, got {self.step_overhead}")


def layouts(n: int, chunked: bool = False) -> list[Layout]:
    """Every layout of n instances: all colocated, all colocated with chunked prefill
    (`chunked`), or k prefill + n-k decode."""
    split: list[Layout] = [(k, n - k, 0, 0) for k in range(1, n)]
    return [(0, 0, n, 0)] + ([(0, 0, 0, n)] if chunked else []) + split


def layout_of(kinds: Sequence[str]) -> Layout:
    """The layout of instances of these kinds ('prefill', 'decode', 'colocated',
    'chunked': `kind_of`)."""
    have = Counter(_role(r) for r in kinds)
    return have["prefill"], have["decode"], have["colocated"], have["chunked"]


def placement_of(layout: Layout) -> PlacementConfig:
    """A deployment of `layout` (one colocated flavour: a mixed one is no candidate)."""
    p, d, c, k = layout
    if c or k:
        return PlacementConfig(mode="colocated", num_instances=c or k, chunked_prefill=not c)
    return PlacementConfig(mode="disagg", num_prefill=p, num_decode=d)


def pick_profile(profiles: Sequence[Profile], model: str) -> Profile:
    """The profile of `model` at tp1 pp1 (a file's first one otherwise)."""
    mine = [p for p in profiles if p.model == model and p.tp == p.pp == 1]
    return (mine or list(profiles))[0]


def predict(
    workload: Workload,
    profile: Profile,
    num_blocks: int,
    ttft: float,
    tpot: float,
    n: int,
    chunk: int = 0,
    load: float = 1.0,
    path: ServingPath | None = None,
) -> dict[Layout, float]:
    """Predicted attainment of both targets for each layout of n instances; with `chunk`,
    the chunked one too (chunked prefill of `chunk` tokens a step); with `load`, on the
    workload's arrivals that much closer together (`AdaptiveConfig.load`); with `path`,
    on the deployment's serving path (its steps' time outside the model: a layout at the
    edge of its capacity is pushed over it by that), else on the profile's time alone."""
    from distserve.sim.run import SimOptions, sim_config, simulate
    from distserve.sim.serving_path import ServingPath

    if load != 1.0:
        workload = Workload(
            tuple(replace(r, arrival=r.arrival / load) for r in workload.requests),
            {**workload.meta, "load": load},
        )
    out = {}
    for layout in layouts(n, chunked=chunk > 0):
        sched = chunked_scheduler(SchedulerConfig(), chunk) if layout[3] else SchedulerConfig()
        opts = SimOptions(path=path or ServingPath(), num_blocks=num_blocks, scheduler=sched)
        summary, _ = simulate(
            sim_config(placement_of(layout), profile, None, opts), workload, ttft, tpot
        )
        out[layout] = summary["attainment"]["both"]
    return out


def window_workload(
    done: Sequence[tuple[float, Sequence[int], int]],
    label: dict[str, object] | None = None,
    limit: int | None = None,
    pending: Sequence[tuple[float, Sequence[int], int, int]] = (),
    start: float | None = None,
) -> Workload:
    """The window's requests as a workload, arrivals from the earliest one's: those that
    finished (arrival, prompt token ids, output length) and those that have not
    (`pending`: arrival, prompt token ids, tokens generated so far, max_tokens), with an
    output length `output_estimator` gives. Under overload few requests finish within the
    window, and the kinds that wait longest (long prompts) fewest: replaying only the
    finished ones under-reads the load and the mix. A pending request that arrived before
    `start` (the window's start) is replayed as arriving then: a backlog the layout must
    serve first. With `limit`, only the latest that many (a cheaper re-plan at a high
    rate). What a re-plan replays (cluster/live.py's window, or the simulator's)."""
    estimate = output_estimator(done)
    rows = [*done] + [
        (arrival if start is None else max(arrival, start), ids, estimate(len(ids), gen, cap))
        for arrival, ids, gen, cap in pending
    ]
    rows.sort(key=lambda d: d[0])
    if limit is not None:
        rows = rows[-limit:]
    if not rows:
        return Workload(())
    t0 = rows[0][0]
    reqs = tuple(
        WorkloadRequest(i, arrival - t0, tuple(ids), out)
        for i, (arrival, ids, out) in enumerate(rows)
    )
    return Workload(reqs, dict(label or {}))


def output_estimator(
    done: Sequence[tuple[float, Sequence[int], int]],
) -> Callable[[int, int, int], int]:
    """`estimate_output(prompt_len, generated, max_tokens)` for requests that have not
    finished, from the finished ones (`done`): the mean output length of those whose
    prompt is within 2x of its own (the same kind of request), or its max_tokens if none
    is (a bound the client chose: the length itself where it sets one, an over-estimate
    where it does not, until requests of its kind finish); never below the tokens it has
    generated, never above max_tokens."""
    pairs = sorted((len(ids), out) for _, ids, out in done)
    lens = [p for p, _ in pairs]
    sums = list(accumulate((out for _, out in pairs), initial=0))

    def estimate_output(prompt_len: int, generated: int, max_tokens: int) -> int:
        lo, hi = bisect_left(lens, prompt_len / 2), bisect_right(lens, prompt_len * 2)
        guess = round((sums[hi] - sums[lo]) / (hi - lo)) if hi > lo else max_tokens
        return max(1, generated, min(guess, max_tokens))

    return estimate_output


@dataclass
class Hysteresis:
    """The switch rule: a layout is switched to only when its predicted attainment beats
    the current layout's by `margin` and has stayed the best for `dwell` seconds. Layouts
    predicted within `margin` of the best count as equally good: of those, the one reached
    with the fewest drains (`drains`: chunked prefill turned on in place before a role
    flip) is the best, so that a near tie does not pick a flip a later re-plan undoes."""

    margin: float
    dwell: float
    candidate: Layout | None = None
    """The better layout being watched, if any."""
    since: float = 0.0
    """When `candidate` became the best."""

    def decide(self, predicted: dict[Layout, float], current: Layout, now: float) -> Layout | None:
        """The layout to switch to now, or None (keep the current one)."""
        held, top = predicted.get(current, 0.0), max(predicted.values())
        better = [
            lay
            for lay, v in predicted.items()
            if v > held and v >= held + self.margin and v >= top - self.margin
        ]
        if not better:
            self.candidate = None
            return None
        best = min(better, key=lambda lay: (drains(current, lay), -predicted[lay]))
        if best != self.candidate:
            self.candidate, self.since = best, now
        if now - self.since < self.dwell:
            return None
        self.candidate = None
        return best


def drains(current: Layout, target: Layout) -> int:
    """Instances that change role (each drains) on the way from `current` to `target`;
    chunked prefill on or off is switched in place and costs none."""
    (p, d, c, k), (p2, d2, c2, k2) = current, target
    return max(0, p2 - p) + max(0, d2 - d) + max(0, c2 + k2 - c - k)


def flip_refusal(others: Sequence[str], role: str, force: bool = False) -> str | None:
    """Why an instance may not turn `role` while the other live instances have roles
    `others` (None: it may): no instance would take prompts, or (unless `force`, a
    degraded mode) prefilled requests would have no decode instance. Kinds ('chunked')
    count as their roles."""
    after = [role_of(_role(r)) for r in others] + [role_of(_role(role))]
    if all(r == "decode" for r in after):
        return "leaves no instance for prompts"
    if "prefill" in after and "decode" not in after and not force:
        return "leaves prefill without decode"
    return None


def next_flip(
    kinds: Sequence[str], target: Layout, allowed: Callable[[int, str], bool]
) -> tuple[int, str] | None:
    """The next flip (instance index, new kind) on the way from instances of `kinds` to
    the `target` layout: the first instance of a kind in surplus that `allowed` lets turn
    a kind in deficit. None when the target is reached; RuntimeError when no flip leads
    there. A flip between roles drains the instance (its new scheduler is unchunked); one
    between 'colocated' and 'chunked' switches its scheduler's policy in place; a prefill
    or decode instance bound for 'chunked' takes both, in two flips."""
    kinds = [_role(r) for r in kinds]
    have, want = Counter(kinds), dict(zip(KINDS, target, strict=True))
    if all(have[r] == want[r] for r in KINDS):
        return None
    for i, role in enumerate(kinds):
        if have[role] <= want[role]:
            continue
        for new in KINDS:
            if have[new] < want[new] and allowed(i, new):
                return i, new
    raise RuntimeError(f"no flip leads from {dict(have)} towards {target}")
