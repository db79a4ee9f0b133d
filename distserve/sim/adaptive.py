"""Adaptive re-planning in the simulator (`simulate --adaptive`), as the controller does it
(cluster/adaptive.py) on the virtual clock: every interval the live window's requests
(those that arrived in it, finished or not, and those still queued or running: cluster/
live.py's) are replayed on every layout of the instances, the same switch rule
(sim/replan.py's Hysteresis: margin and dwell) picks whether to move, and roles flip one
at a time in the same order (`next_flip`) through the simulator's drain-then-swap flip
(Simulator.flip), or chunked prefill turned on or off in place (Simulator.rechunk).
As the controller's loop, the next re-plan is an interval after the
last one and its flips have ended. Not modelled: the wall time of the re-plan itself
(the real loop flips that much later; ~0.1-1 s)."""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING, Any

from distserve.sim.profile import load_profiles
from distserve.sim.replan import (
    AdaptiveConfig,
    Hysteresis,
    Layout,
    flip_refusal,
    layout_of,
    next_flip,
    pick_profile,
    predict,
    role_of,
    window_workload,
)

if TYPE_CHECKING:
    from distserve.core import Request
    from distserve.sim.simulator import Simulator


class SimAdaptive:
    """The re-planning loop of one simulated deployment."""

    def __init__(self, sim: Simulator, config: AdaptiveConfig, window: float) -> None:
        if not window > 0:
            raise ValueError(f"the live window must be > 0 s, got {window}")
        self.sim, self.config, self.window = sim, config, window
        latency = sim.config.latency[sim.config.placement.roles[0]]
        self.profile = pick_profile(load_profiles(config.profile), latency.profile.model)
        self.hysteresis = Hysteresis(config.margin, config.dwell)
        path = latency.path
        if config.step_overhead is not None:
            path = dataclasses.replace(path, step_overhead=config.step_overhead)
        self.path = path
        """The serving path re-plans predict on: the simulated instances' (its overhead
        `config.step_overhead` where that is given)."""
        self._done: collections.deque[tuple[float, tuple[int, ...], int]] = collections.deque()
        """(arrival, prompt, output length) of the window's finished requests, in finish
        order, trimmed as cluster/live.py's window is."""
        self._pending: dict[str, Request] = {}
        """Requests that arrived and have not finished, by id."""
        self.target: Layout | None = None
        """The layout the flips under way lead to."""
        self.replans: list[dict[str, Any]] = []
        """Each re-plan: when, the layout then, the predictions, the switch (if any)."""

    def start(self) -> None:
        self._next(self.config.interval)

    def arrived(self, req: Request) -> None:
        """As the controller's window: at admission, before routing."""
        self._pending[req.request_id] = req

    def forget(self, request_id: str) -> None:
        """A request ended without finishing (refused)."""
        self._pending.pop(request_id, None)

    def finished(self, req: Request, t: float) -> None:
        self._pending.pop(req.request_id, None)
        self._done.append((req.arrival_time, tuple(req.prompt_token_ids), req.num_output_tokens))
        self._trim(t)

    def _trim(self, now: float) -> None:
        while self._done and self._done[0][0] < now - self.window:
            self._done.popleft()

    def _next(self, t: float) -> None:
        self.sim._at(t, "replan", self._replan)

    def _work_left(self) -> bool:
        sim = self.sim
        return bool(
            sim._next_arrival < len(sim._arrivals)
            or sim._turns_due
            or sim._held
            or any(kind != "replan" for _, _, kind, _ in sim._events)
        )

    def _replan(self, t: float) -> None:
        cfg, sim = self.config, self.sim
        self._trim(t)
        pending = [
            (r.arrival_time, r.prompt_token_ids, r.num_output_tokens, r.sampling_params.max_tokens)
            for r in self._pending.values()
        ]
        label: dict[str, object] = {"dataset": "live window"}
        workload = window_workload(self._done, label, cfg.max_requests, pending, t - self.window)
        busy = any(i.draining or not i.alive for i in sim.instances)
        current = None if busy else layout_of([sim.kind(i) for i in sim.instances])
        if current is not None and len(workload) >= cfg.min_requests:
            blocks = sim.config.num_blocks[sim.instances[0].role]
            n = len(sim.instances)
            predicted = predict(
                workload, self.profile, blocks, cfg.ttft_slo, cfg.tpot_slo, n, cfg.chunk,
                cfg.load, self.path
            )  # fmt: skip
            best = self.hysteresis.decide(predicted, current, t)
            self.replans.append(
                {"at": t, "layout": current, "requests": len(workload),
                 "predicted": {"/".join(map(str, k)): v for k, v in predicted.items()},
                 "switch": best}
            )  # fmt: skip
            if best is not None:
                self.target = best
                self._flip_next(t)
                return  # the next re-plan comes an interval after the flips
        if self._work_left():
            self._next(t + cfg.interval)

    def _flip_next(self, t: float) -> None:
        sim = self.sim
        assert self.target is not None

        def allowed(i: int, kind: str) -> bool:
            inst = sim.instances[i]
            others = [o.role for o in sim.instances if o is not inst and o.alive]
            return inst.alive and not inst.draining and flip_refusal(others, kind) is None

        step = next_flip([sim.kind(i) for i in sim.instances], self.target, allowed)
        if step is None:
            self.target = None
            self._next(t + self.config.interval)
            return
        inst, kind = sim.instances[step[0]], step[1]
        if role_of(kind) != inst.role:
            sim.flip(inst, role_of(kind), t)  # a chunked one is chunked next, in place
        else:
            sim.rechunk(inst, self.config.chunk if kind == "chunked" else 0, t)

    def flipped(self, t: float) -> None:
        """A flip has ended: the next one towards the target, or the next re-plan."""
        if self.target is not None:
            self._flip_next(t)
