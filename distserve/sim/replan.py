"""Adaptive re-planning's policy, shared by the real controller (cluster/adaptive.py) and
the simulator (sim/simulator.py, `simulate --adaptive`): which layouts of n instances
exist, how each is predicted on a window of finished requests (the simulator replays
them), when a better one is switched to (a margin and a dwell time: hysteresis), and in
which order roles flip on the way there (one at a time, never leaving a role's requests
with no instance to take them). Torch-free, so the simulator runs it too."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from distserve.config import PlacementConfig
from distserve.workload.spec import Workload, WorkloadRequest

if TYPE_CHECKING:
    from distserve.sim.profile import Profile

Layout = tuple[int, int, int]
"""(prefill, decode, colocated) instance counts."""

ROLES = ("prefill", "decode", "colocated")
"""The order of a layout's counts."""


def _role(r: object) -> str:
    """A role's name, from a string or the runtime's Role enum."""
    return str(getattr(r, "value", r))


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
        default=20, metadata={"help": "finished requests the window needs before a re-plan"}
    )
    max_requests: int = field(
        default=400, metadata={"help": "the latest finished requests a re-plan replays, at most"}
    )

    def __post_init__(self) -> None:
        for name in ("ttft_slo", "tpot_slo", "interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.margin < 0 or self.dwell < 0 or self.min_requests < 1:
            raise ValueError("margin and dwell must be >= 0, min_requests >= 1")


def layouts(n: int) -> list[Layout]:
    """Every layout of n instances: all colocated, or k prefill + n-k decode."""
    return [(0, 0, n)] + [(k, n - k, 0) for k in range(1, n)]


def layout_of(roles: Sequence[str]) -> Layout:
    """The layout of instances with these roles ('prefill', 'decode', 'colocated')."""
    have = Counter(_role(r) for r in roles)
    return have["prefill"], have["decode"], have["colocated"]


def placement_of(layout: Layout) -> PlacementConfig:
    p, d, c = layout
    if c:
        return PlacementConfig(mode="colocated", num_instances=c)
    return PlacementConfig(mode="disagg", num_prefill=p, num_decode=d)


def pick_profile(profiles: Sequence[Profile], model: str) -> Profile:
    """The profile of `model` at tp1 pp1 (a file's first one otherwise)."""
    mine = [p for p in profiles if p.model == model and p.tp == p.pp == 1]
    return (mine or list(profiles))[0]


def predict(
    workload: Workload, profile: Profile, num_blocks: int, ttft: float, tpot: float, n: int
) -> dict[Layout, float]:
    """Predicted attainment of both targets for each layout of n instances."""
    from distserve.sim.run import SimOptions, sim_config, simulate

    opts = SimOptions(num_blocks=num_blocks)
    out = {}
    for layout in layouts(n):
        summary, _ = simulate(
            sim_config(placement_of(layout), profile, None, opts), workload, ttft, tpot
        )
        out[layout] = summary["attainment"]["both"]
    return out


def window_workload(
    done: Sequence[tuple[float, Sequence[int], int]],
    label: dict[str, object] | None = None,
    limit: int | None = None,
) -> Workload:
    """Finished requests (arrival, prompt token ids, output length) as a workload, arrivals
    from the earliest one's; with `limit`, only the latest that many (a cheaper re-plan at
    a high rate). What a re-plan replays (cluster/live.py's window, or the simulator's)."""
    rows = sorted(done, key=lambda d: d[0])
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


@dataclass
class Hysteresis:
    """The switch rule: a layout is switched to only when its predicted attainment beats
    the current layout's by `margin` and has stayed the best for `dwell` seconds."""

    margin: float
    dwell: float
    candidate: Layout | None = None
    """The better layout being watched, if any."""
    since: float = 0.0
    """When `candidate` became the best."""

    def decide(self, predicted: dict[Layout, float], current: Layout, now: float) -> Layout | None:
        """The layout to switch to now, or None (keep the current one)."""
        best = max(predicted, key=lambda lay: (predicted[lay], lay == current))
        if best == current or predicted[best] < predicted.get(current, 0.0) + self.margin:
            self.candidate = None
            return None
        if best != self.candidate:
            self.candidate, self.since = best, now
        if now - self.since < self.dwell:
            return None
        self.candidate = None
        return best


def flip_refusal(others: Sequence[str], role: str, force: bool = False) -> str | None:
    """Why an instance may not turn `role` while the other live instances have roles
    `others` (None: it may): no instance would take prompts, or (unless `force`, a
    degraded mode) prefilled requests would have no decode instance."""
    after = [_role(r) for r in others] + [_role(role)]
    if all(r == "decode" for r in after):
        return "leaves no instance for prompts"
    if "prefill" in after and "decode" not in after and not force:
        return "leaves prefill without decode"
    return None


def next_flip(
    roles: Sequence[str], target: Layout, allowed: Callable[[int, str], bool]
) -> tuple[int, str] | None:
    """The next flip (instance index, new role) on the way from instances with `roles` to
    the `target` layout: the first instance of a role in surplus that `allowed` lets turn
    a role in deficit. None when the target is reached; RuntimeError when no flip leads
    there."""
    roles = [_role(r) for r in roles]
    have, want = Counter(roles), dict(zip(ROLES, target, strict=True))
    if all(have[r] == want[r] for r in ROLES):
        return None
    for i, role in enumerate(roles):
        if have[role] <= want[role]:
            continue
        for new in ROLES:
            if have[new] < want[new] and allowed(i, new):
                return i, new
    raise RuntimeError(f"no flip leads from {dict(have)} towards {target}")
