"""A discrete-event simulator of a placement: instances run the engine's own schedulers
(core/) with a latency model in place of the model, on a virtual clock, with the real
cluster's routing and pull-based migration. Same workload in, same results out as the
load client."""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import math
import random
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distserve.config import PlacementConfig
from distserve.core import (
    BlockManager,
    ColocatedScheduler,
    DecodeScheduler,
    PrefillScheduler,
    Request,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    StepPlan,
    StepResult,
)
from distserve.core.kv_store import KVStore
from distserve.core.prefix_cache import SharedNames, share_names, shared_names
from distserve.core.request import handoff_copy
from distserve.core.routing import PrefillOnDecode, pick_decode, pick_prefill
from distserve.core.scheduler.fast_forward import (
    begin_span,
    end_span,
    steady_decode_steps,
)
from distserve.metrics.results import RequestResult
from distserve.sim import spans
from distserve.sim.latency import LatencyModel
from distserve.sim.replan import AdaptiveConfig, chunked_scheduler, flip_refusal, kind_of
from distserve.workload import Workload

_TOKEN = 0  # what the simulated model "samples": any id; requests end by max_tokens


@dataclass
class SimInstance:
    """One simulated instance: a real scheduler and a latency model."""

    name: str
    role: str
    scheduler: Scheduler
    latency: LatencyModel
    alive: bool = True
    busy: bool = False
    decoding: bool = False
    """The step in progress has decode tokens (what contention counts)."""
    steps: int = 0
    busy_seconds: float = 0.0
    plans: list[StepPlan] = field(default_factory=list)
    draining: bool = False
    """Flipping its role: routing skips it (core/routing.py) until its requests are done."""
    flipping_to: str = ""
    flip_started: float = 0.0
    flip_kind: str = ""
    """What the layout counted it as when its flip began."""
    flip_moved: int = 0
    """Queued requests the flip in progress handed to other instances."""
    span: spans.Span | None = None
    """The cuttable span of decode steps in progress, if any (`Simulator._fast_forward`)."""


@dataclass
class SimConfig:
    """What the simulator needs beyond the workload."""

    placement: PlacementConfig
    latency: dict[str, LatencyModel]
    """Per role ('prefill', 'decode', 'colocated')."""
    num_blocks: dict[str, int]
    """KV blocks of one instance, per role."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    block_size: int = 16
    watermark: float = 0.01
    num_swap_blocks: int = 0
    """Host blocks for swap preemption, per instance (copies are not timed)."""
    prefix_caching: bool = True
    """Each instance's block manager caches prefixes as the engine's does, so a prompt
    that shares full blocks with an earlier one computes (and migrates) only the rest."""
    fast_forward: bool = True
    record_plans: bool = False
    """Keep every instance's plans (tests compare them with a real instance's)."""
    step_noise: float = 0.0
    """Sigma of a lognormal factor (mean 1) drawn for each step's time; 0: every step
    takes its model's time. A served step's time varies around its model (the same
    prompt's prefill by +-25% on this VM), which near saturation moves attainment."""
    seed: int = 0
    """Of the step-noise draws: same seed, same result."""
    kv_store_slots: int = 0
    """Blocks the KV store holds (serve --kv-store-gb; core/kv_store.py); 0: no store. With
    one, every prefill writes its prompt's blocks to it and a prompt finds there the prefix
    blocks another instance computed (loaded, not computed; the copy is not timed: from
    host memory it costs ~1% of computing them on a CPU, benchmarks/kv_store.py). Decode
    spans do not write: generated tokens' blocks are never a later prompt's prefix here."""
    kv_store_disk_slots: int = 0
    """Blocks of the store's disk tier (serve --kv-store-disk-gb): evicted prefix blocks
    go there and a prompt loads them back as from memory (the disk read is not timed)."""
    prefill_on_decode: float | None = None
    """The per-request rule (core/routing.py's PrefillOnDecode) with this TPOT target as
    the longest step a decode instance may take to prefill a prompt; None: off."""
    adaptive: AdaptiveConfig | None = None
    """Re-plan the layout every `adaptive.interval` s on the requests of the last
    `live_window` s (finished or not, and those still queued) and flip roles as serve
    --adaptive does (sim/adaptive.py); None: off."""
    live_window: float = 120.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "placement": dataclasses.asdict(self.placement),
            "latency": {
                k: {
                    "profile": v.profile.to_dict(),
                    "step_overhead": v.path.step_overhead,
                    "transfer_bandwidth": v.transfer_bandwidth,
                    "transfer_overhead": v.path.transfer_overhead,
                    "kv_bytes_per_token": v.kv_bytes_per_token,
                }
                for k, v in self.latency.items()
            },
            "num_blocks": self.num_blocks,
            "scheduler": {
                k: (v.value if hasattr(v, "value") else v)
                for k, v in dataclasses.asdict(self.scheduler).items()
            },
            "block_size": self.block_size,
            "prefix_caching": self.prefix_caching,
            "step_noise": self.step_noise,
            "seed": self.seed,
            "prefill_on_decode": self.prefill_on_decode,
            "kv_store_slots": self.kv_store_slots,
            "kv_store_disk_slots": self.kv_store_disk_slots,
            "adaptive": dataclasses.asdict(self.adaptive) if self.adaptive else None,
            "live_window": self.live_window,
        }


class Simulator:
    """Runs a workload through simulated instances; `run` returns per-request results."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.instances = [self._instance(role, i) for i, role in enumerate(config.placement.roles)]
        self.store = (
            KVStore(
                config.kv_store_slots,
                config.block_size,
                config.latency[config.placement.roles[0]].profile.model,
                serves_prefixes=config.prefix_caching,
                num_disk_slots=config.kv_store_disk_slots,
            )
            if config.kv_store_slots
            else None
        )
        """The KV store's directory, if the deployment has one."""
        for inst in self.instances:
            if self.store is not None and inst.role != "decode":
                inst.scheduler.remote_prefix = self.store.prefix_blocks
        self._events: list[tuple[float, int, str, Callable[[float], None]]] = []
        self._seq = itertools.count()
        self._awaiting: deque[tuple[SimInstance, Request]] = deque()
        self._owner: dict[str, SimInstance] = {}
        self._first: dict[str, float] = {}
        self._results: dict[str, RequestResult] = {}
        self.now = 0.0
        self._give_up: Callable[[RequestResult], bool] | None = None
        self._stopped = False
        self._lost: Callable[[RequestResult], bool] | None = None
        self._slo = (math.inf, math.inf)
        self._ttft_seen = 0  # arrivals whose TTFT deadline has been looked at
        self._tpot_due: list[tuple[float, str]] = []  # (when TPOT can no longer be met, id)
        self._reported: set[int] = set()  # indices reported to `lost`
        self._arrivals: list[Any] = []
        self._next_arrival = 0
        self._turns_due: list[tuple[float, int, Any]] = []
        """(time, index, request): later turns of sessions, due once the previous turn's
        answer has finished plus its think time (a heap)."""
        self._next_turn: dict[str, Any] = {}
        """Request id -> the next turn of its session (multi-turn workloads)."""
        self._rng = random.Random(config.seed)
        tpot = config.prefill_on_decode
        self._rule = (
            PrefillOnDecode(config.latency["prefill"], config.latency["decode"], tpot)
            if tpot is not None and config.placement.mode == "disagg"
            else None
        )
        """The per-request rule, if on: a decode instance may prefill a short prompt."""
        self.prefilled_on_decode = 0
        """Requests the rule sent to a decode instance (a counter)."""
        self._held: deque[Any] = deque()
        """Arrivals while no prompt-taking instance is open (all flipping): placed when
        one opens, as the controller's orphans are."""
        self.flips: list[dict[str, Any]] = []
        """Role flips done: when, which instance, old and new role, seconds draining."""
        self.adaptive = None
        if config.adaptive is not None:
            from distserve.sim.adaptive import SimAdaptive

            self.adaptive = SimAdaptive(self, config.adaptive, config.live_window)
        self._cuttable = (
            config.fast_forward
            and config.step_noise == 0
            and self.adaptive is None
            and self._rule is None
            and self.store is None
        )
        """Whether spans of non-contended instances run until work comes for them
        (sim/spans.py): nothing but routing (prompts, handoffs, transfers) looks at an instance
        or changes it from outside. Otherwise a span ends before the next event anywhere."""

    def _instance(self, role: str, index: int) -> SimInstance:
        latency = self.config.latency[role]
        return SimInstance(f"{role}-{index}", role, self._scheduler(role), latency)

    def _scheduler(self, role: str) -> Scheduler:
        """A fresh scheduler of `role`, with its own cache (a new instance's, or a flip's)."""
        cfg = self.config
        sched_cfg = dataclasses.replace(
            cfg.scheduler, chunked_prefill=cfg.placement.chunked_prefill and role == "colocated"
        )
        blocks = BlockManager(
            cfg.num_blocks[role],
            cfg.block_size,
            cfg.watermark,
            prefix_caching=cfg.prefix_caching,
            cache_key=cfg.latency[role].profile.model,
        )
        swap = BlockManager(cfg.num_swap_blocks, cfg.block_size) if cfg.num_swap_blocks else None
        kinds: dict[str, type[PrefillScheduler | DecodeScheduler | ColocatedScheduler]] = {
            "prefill": PrefillScheduler,
            "decode": DecodeScheduler,
            "colocated": ColocatedScheduler,
        }
        scheduler = kinds[role](sched_cfg, blocks, swap)
        scheduler.detailed_plans = False
        return scheduler

    def kind(self, inst: SimInstance) -> str:
        """What a layout counts `inst` as (sim/replan.py's kinds: 'chunked' too)."""
        return kind_of(inst.role, inst.scheduler.config.chunked_prefill)

    # ---- events -------------------------------------------------------------------
    def _at(self, t: float, kind: str, fn: Callable[[float], None]) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, fn))

    def run(
        self,
        workload: Workload,
        give_up: Callable[[RequestResult], bool] | None = None,
        lost: Callable[[RequestResult], bool] | None = None,
        slo: tuple[float, float] = (math.inf, math.inf),
    ) -> list[RequestResult]:
        """Simulate until every request is done, or until `give_up` (called with each
        finished request) says the rest does not matter; unfinished requests then have
        no latencies (they count as failed). `lost`, with `slo` (TTFT, TPOT targets): called
        once with each unfinished request as soon as it is certain to miss a target (its
        first token came, or is still to come, after the TTFT target; or even finishing
        now would give it a TPOT above the target); True from it stops the run too."""
        self._give_up = give_up
        self._stopped = False
        self._lost, self._slo = lost, slo
        self._ttft_seen, self._tpot_due, self._reported = 0, [], set()
        # Arrivals stay in their own sorted list: the heap holds only the few events in
        # flight, so a horizon over selected kinds is cheap to find. A session's later
        # turns arrive when the turn before has finished (closed loop, as bench sends
        # them): they wait in their own heap.
        arrivals = [w for w in workload.requests if w.session is None or w.turn == 0]
        self._next_turn, self._turns_due = _chain_turns(workload), []
        if self._next_turn:
            self._lost = None  # the early-stop tests assume arrivals known in advance
        for wr in workload.requests:
            self._results[str(wr.index)] = RequestResult(
                wr.index, wr.prompt_len, wr.output_len, wr.arrival, sent=wr.arrival,
                session=wr.session, turn=wr.turn,
            )  # fmt: skip
        self._next_arrival = 0
        self._arrivals = arrivals
        self._alone = self._unshared(workload)
        if self.adaptive is not None:
            self.adaptive.start()
        while (
            self._events or self._next_arrival < len(arrivals) or self._turns_due
        ) and not self._stopped:
            due = self._arrival_time()
            if due < math.inf and (not self._events or due <= self._events[0][0]):
                wr = self._pop_arrival()
                self.now = due
                self._arrive(due, wr)
            else:
                t, _, _, fn = heapq.heappop(self._events)
                self.now = t
                fn(t)
            if self._lost is not None and not self._stopped:
                self._look_for_lost()
        return [self._results[str(w.index)] for w in workload.requests]

    def _arrival_time(self) -> float:
        """When the next request arrives (inf: none is known yet)."""
        t = (
            self._arrivals[self._next_arrival].arrival
            if self._next_arrival < len(self._arrivals)
            else math.inf
        )
        return min(t, self._turns_due[0][0]) if self._turns_due else t

    def _pop_arrival(self) -> Any:
        """The next arriving request (`_arrival_time`'s); a later turn's result gets the
        time it was sent, as bench records it."""
        listed = self._next_arrival < len(self._arrivals)
        if self._turns_due and (
            not listed or self._turns_due[0][0] < self._arrivals[self._next_arrival].arrival
        ):
            t, _, wr = heapq.heappop(self._turns_due)
            res = self._results[str(wr.index)]
            res.arrival = res.sent = t
            return dataclasses.replace(wr, arrival=t)
        self._next_arrival += 1
        return self._arrivals[self._next_arrival - 1]

    def _next_turn_due(self, rid: str, t: float) -> None:
        """A session's turn has ended (answered, or refused) at `t`: its next turn is due
        after its think time."""
        nxt = self._next_turn.pop(rid, None)
        if nxt is not None:
            heapq.heappush(self._turns_due, (t + nxt.think_time, nxt.index, nxt))

    def _look_for_lost(self) -> None:
        """Report the requests that became certain misses by now. Each test is the one the
        result will be judged by, on a time no later than the real one (float rounding is
        monotone), so it never reports a request that could still attain."""
        assert self._lost is not None
        ttft, tpot = self._slo
        now = self.now
        while self._ttft_seen < self._next_arrival:
            wr = self._arrivals[self._ttft_seen]
            if not now - wr.arrival > ttft:
                break  # arrivals are in order: the later ones are not due either
            self._ttft_seen += 1
            rid = str(wr.index)
            first = self._first.get(rid)
            res = self._results[rid]
            if res.e2e is None and (first is None or first - wr.arrival > ttft):
                self._report_lost(res)
        while self._tpot_due and self._tpot_due[0][0] < now:
            _, rid = heapq.heappop(self._tpot_due)
            res = self._results[rid]
            if res.e2e is None and (now - self._first[rid]) / (res.output_len - 1) > tpot:
                self._report_lost(res)

    def _watch_tpot(self, rid: str, first: float) -> None:
        """From its first token on, a request's TPOT target has a due time."""
        n = self._results[rid].output_len
        if n > 1 and self._slo[1] < math.inf:
            heapq.heappush(self._tpot_due, (first + self._slo[1] * (n - 1), rid))

    def _report_lost(self, res: RequestResult) -> None:
        if res.index in self._reported:
            return
        self._reported.add(res.index)
        assert self._lost is not None
        if self._lost(res):
            self._stopped = True

    def _horizon(self, inst: SimInstance) -> float:
        """The earliest future event that could change `inst`'s next decision. Prompt-taking
        instances: the next arrival. Decode instances: anything in flight (a prefill ending
        hands over requests, a transfer adds one), and the next arrival too while a prefill
        instance is idle (it would start a prefill that could end within the span)."""
        arrival = self._arrival_time()
        if inst.role != "decode" and not inst.latency.contended:
            return arrival
        t = self._events[0][0] if self._events else float("inf")  # a heap: its first is least
        if inst.role != "decode":  # contended: another instance's step changes this one's
            return min(t, arrival)
        if self._rule is not None or any(
            not i.busy for i in self.instances if i.role == "prefill"
        ):  # an arrival may be prefilled here (the rule), or end a prefill within the span
            t = min(t, arrival)
        return t

    def _arrive(self, t: float, wr: Any) -> None:
        params = SamplingParams(max_tokens=wr.output_len, ignore_eos=True, temperature=0.0)
        req = Request(str(wr.index), list(wr.prompt_token_ids), params, wr.arrival)
        if self.config.prefix_caching:
            share_names(req, _prompt_names(wr.prompt_token_ids))
        if self.adaptive is not None:
            self.adaptive.arrived(req)  # a held one again when placed: the same id
        takers = [i for i in self.instances if i.role != "decode"]
        for i in takers:
            spans.settle(i, t)
        # A prompt whose first block no other request shares hits no cache: every
        # instance's own tokens are its whole prompt, and routing by load alone picks
        # the same instance
        inst = pick_prefill(takers, None if wr.index in self._alone else req)
        if inst is None:  # every prompt-taking instance is flipping: wait for one
            self._held.append(wr)
            return
        try:
            inst.scheduler.check_request(req)
        except ValueError as e:  # as the server would answer 400
            self._results[req.request_id].error = str(e)
            if self.adaptive is not None:
                self.adaptive.forget(req.request_id)
            self._next_turn_due(req.request_id, t)
            return
        if self._rule is not None:
            decoders = [i for i in self.instances if i.role == "decode"]
            dec = self._rule.pick(inst, decoders, req)
            try:
                if dec is not None:
                    dec.scheduler.check_request(req)
                    inst = dec
                    self.prefilled_on_decode += 1
            except ValueError:
                pass  # too big for the decode instance's cache: the prefill instance takes it
        spans.cut(self, inst, t)
        inst.scheduler.add_request(req)
        self._owner[req.request_id] = inst
        # Wake after every arrival of this instant is queued (arrivals go first at a tie).
        self._at(t, "wake", functools.partial(self._wake, inst))

    def _unshared(self, workload: Workload) -> set[int]:
        """Requests whose prompt's first full block no other request of the run can
        hold (by tokens; a short prompt's block ends in `_TOKEN` outputs), while every
        cache starts empty and no KV store serves prefixes: no lookup of theirs can hit."""
        bs = self.config.block_size
        if (
            not self.config.prefix_caching
            or self.store is not None
            or any(i.scheduler.blocks.num_cached_blocks or i.scheduler.blocks._tables
                   for i in self.instances)
        ):  # fmt: skip
            return set()
        pad = (_TOKEN,) * bs
        first = {w.index: (tuple(w.prompt_token_ids[:bs]) + pad)[:bs] for w in workload.requests}
        firsts = Counter(
            first[w.index] for w in workload.requests if w.prompt_len + w.output_len >= bs
        )
        # a prompt of at most one block looks up none (its last token is always computed)
        return {
            w.index for w in workload.requests if w.prompt_len <= bs or firsts[first[w.index]] == 1
        }

    # ---- role flips: cluster/flip.py's, on the virtual clock -------------------------
    def flip(self, inst: SimInstance, role: str, t: float) -> None:
        """Start turning `inst` into a `role` instance as the controller does: it stops
        admitting, its queued work that has not started moves to instances of its old
        role, what it computes finishes (prefilled requests leave through the normal
        migration), then it takes a fresh scheduler of `role` and admits again."""
        others = [i.role for i in self.instances if i is not inst and i.alive]
        why = flip_refusal(others, role) or (
            "is flipping" if inst.draining else "has that role" if inst.role == role else None
        )
        if why is not None:
            raise ValueError(f"cannot flip {inst.name} to {role}: it {why}")
        inst.draining, inst.flipping_to, inst.flip_started = True, role, t
        inst.flip_kind = self.kind(inst)
        inst.flip_moved = self._hand_over(inst, t)
        self._wake(inst, t)

    def rechunk(self, inst: SimInstance, chunk: int, t: float) -> None:
        """Turn chunked prefill of `chunk` tokens a step on (0: off, the deployment's own
        unchunked policy) on a colocated instance, in place and at once
        (ColocatedScheduler.reconfigure: nothing drains, moves or is computed twice), as
        the controller does (cluster/flip.py's Flips.rechunk)."""
        sched = inst.scheduler
        if not isinstance(sched, ColocatedScheduler) or inst.draining or not inst.alive:
            raise ValueError(f"cannot switch chunked prefill of {inst.name}: not live colocated")
        old = self.kind(inst)
        base = dataclasses.replace(self.config.scheduler, chunked_prefill=False)
        sched.reconfigure(chunked_scheduler(base, chunk) if chunk else base)
        self.flips.append(
            {"at": t, "instance": inst.name, "old": old, "new": self.kind(inst),
             "seconds": 0.0, "moved": 0}
        )  # fmt: skip
        self._at(t, "wake", functools.partial(self._wake, inst))
        if self.adaptive is not None:
            self._at(t, "flip", self.adaptive.flipped)

    def _hand_over(self, inst: SimInstance, t: float) -> int:
        """Move what has not started on a flipping instance to others of its role; returns
        how many requests moved."""
        sched, moved = inst.scheduler, 0
        if isinstance(sched, DecodeScheduler):  # prefilled, not admitted: migrate elsewhere
            for req in list(sched.pending):
                sched.abort_request(req.request_id, t)
                src = self._owner[req.request_id]
                self._awaiting.append((src, src.scheduler.requests[req.request_id]))
                moved += 1
            self._dispatch(t)
            return moved
        entry = [i for i in self.instances if i.role != "decode" and i is not inst]
        if pick_prefill(entry) is None:
            return 0  # no other instance takes prompts now: the queue drains here
        for req in list(sched.waiting):
            if req.num_computed_tokens:
                continue  # partly computed (chunked, preempted): it finishes here
            sched.abort_request(req.request_id, t)
            again = Request(
                req.request_id, list(req.prompt_token_ids), req.sampling_params,
                req.arrival_time, output_token_ids=list(req.output_token_ids),
                timestamps=dict(req.timestamps), num_preemptions=req.num_preemptions,
            )  # fmt: skip
            share_names(again, shared_names(req))
            dst = pick_prefill(entry, again)
            assert dst is not None
            dst.scheduler.add_request(again)
            self._owner[req.request_id] = dst
            self._at(t, "wake", functools.partial(self._wake, dst))
            moved += 1
        return moved

    def _end_flip(self, inst: SimInstance, t: float) -> None:
        """A drained instance takes its new role; arrivals held meanwhile are placed."""
        old, role = inst.flip_kind, inst.flipping_to
        inst.scheduler = self._scheduler(role)
        if self.store is not None and role != "decode":
            inst.scheduler.remote_prefix = self.store.prefix_blocks
        inst.role, inst.latency, inst.draining = role, self.config.latency[role], False
        self.flips.append(
            {"at": inst.flip_started, "instance": inst.name, "old": old, "new": role,
             "seconds": t - inst.flip_started, "moved": inst.flip_moved}
        )  # fmt: skip
        held, self._held = self._held, deque()
        for wr in held:
            self._arrive(t, wr)
        self._dispatch(t)
        if self.adaptive is not None:
            self.adaptive.flipped(t)

    # ---- instance steps -----------------------------------------------------------
    def _busy_share(self, inst: SimInstance) -> float:
        """Share of the other instances in a step with decode tokens (only where
        contention is modelled): their streamed tokens keep the frontend busy on the same
        cores, which slows a step more than the other instance's prompt does (design
        note 14)."""
        if not inst.latency.contended or len(self.instances) < 2:
            return 0.0
        busy = sum(i.busy and i.decoding for i in self.instances if i is not inst and i.alive)
        return busy / (len(self.instances) - 1)

    def _wake(self, inst: SimInstance, t: float) -> None:
        if inst.busy:
            return
        if inst.draining and not inst.scheduler.has_unfinished():
            self._end_flip(inst, t)
        sched = inst.scheduler
        if isinstance(sched, DecodeScheduler):
            self._admit(inst, sched, t)
        if self.config.fast_forward and self._fast_forward(inst, t):
            return
        plan = sched.schedule(t)
        if plan.empty:
            return
        pending = None
        if self.store is not None and (plan.chunks or plan.loads):
            plan, pending = self.store.plan(plan, sched.requests)
        if self.config.record_plans:
            inst.plans.append(plan)
        dt = inst.latency.step_time(plan, self._busy_share(inst))
        inst.decoding = any(not c.is_prefill for c in plan.chunks)  # no tuple of them
        if self.config.step_noise > 0:
            s = self.config.step_noise
            dt *= math.exp(self._rng.gauss(-s * s / 2, s))
        inst.busy, inst.steps, inst.busy_seconds = True, inst.steps + 1, inst.busy_seconds + dt
        self._at(
            t + dt, "step", functools.partial(self._step_done, inst=inst, plan=plan, stored=pending)
        )

    def _admit(self, inst: SimInstance, sched: DecodeScheduler, t: float) -> None:
        """Admit what migrations the decode instance can, each KV pull then under way."""
        for req in sched.admit_migrations(t):
            src = self._owner[req.request_id]
            local = sched.num_local_blocks(req.request_id) * sched.blocks.block_size
            self._at(
                t + inst.latency.transfer_time(req.num_computed_tokens - local),
                "transfer",
                functools.partial(self._transferred, req=req, src=src, dst=inst),
            )

    def _fast_forward(self, inst: SimInstance, t: float) -> bool:
        """Run a steady span of decode steps as one event, stopping before the next
        event anywhere (any of them might change this instance's next decision), or,
        where spans are cuttable, as long as the batch is steady (sim/spans.py)."""
        if self.config.step_noise > 0:  # noise: one draw per step
            return False
        if self._cuttable and not inst.latency.contended:
            return spans.begin(self, inst, t)
        horizon = self._horizon(inst)
        lat = inst.latency
        share = self._busy_share(inst)
        # a span is 2 steps or more: not if the second would start at the horizon or later
        if t + lat.min_decode_step_time(len(inst.scheduler.running), share) >= horizon:
            return False
        k = steady_decode_steps(inst.scheduler)
        if k < 2:
            return False
        contexts = [r.num_tokens - 1 for r in inst.scheduler.running]
        lo, hi = 0, k  # the largest m whose first m steps all start before the horizon
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if t + lat.decode_steps_time(contexts, mid - 1, share) < horizon:
                lo = mid
            else:
                hi = mid - 1
        if lo < 2:
            return False
        dt = lat.decode_steps_time(contexts, lo, share)
        inst.busy, inst.steps, inst.busy_seconds = True, inst.steps + lo, inst.busy_seconds + dt
        inst.decoding = True

        batch = list(inst.scheduler.running)
        begin_span(inst.scheduler, batch, lo, t)

        def done(t2: float, inst: SimInstance = inst, m: int = lo) -> None:
            inst.busy = False
            self._spanned(inst, batch, m, t2)

        self._at(t + dt, "span", done)
        return True

    def _spanned(
        self,
        inst: SimInstance,
        batch: list[Request],
        steps: int,
        t: float,
        joined: list[int] | None = None,
    ) -> None:
        """A span's last step ended at `t`: as `_step_done` after a step."""
        finished = end_span(inst.scheduler, batch, steps, _TOKEN, t, joined)
        for req in finished:
            self._record(req, t)
        if finished:
            self._dispatch(t)
        self._wake(inst, t)

    def _step_done(self, t: float, inst: SimInstance, plan: StepPlan, stored: Any = None) -> None:
        if stored and self.store is not None:
            self.store.commit(stored)
        sampled = {c.request_id: _TOKEN for c in plan.chunks if c.sampling_params is not None}
        outputs = inst.scheduler.update(plan, StepResult(sampled), t)
        inst.busy = False
        for out in outputs:  # out.finished: its request's, as update left it
            rid = out.request.request_id
            if rid not in self._first:
                self._first[rid] = t
                if self._lost is not None and not out.finished:
                    self._watch_tpot(rid, t)
            if out.finished:
                self._record(out.request, t)
            elif inst.role == "prefill":
                self._awaiting.append((inst, out.request))
        self._dispatch(t)
        self._wake(inst, t)

    def _dispatch(self, t: float) -> None:
        decoders = [i for i in self.instances if i.role == "decode"]
        while self._awaiting:
            src, req = self._awaiting[0]
            if req.finished:
                self._awaiting.popleft()
                continue
            for i in decoders:
                spans.settle(i, t)
            dst = pick_decode(decoders)
            if dst is None:
                return
            self._awaiting.popleft()
            assert isinstance(dst.scheduler, DecodeScheduler)
            spans.admit_after_step(self, dst, t)
            copy = handoff_copy(req)
            share_names(copy, shared_names(req))
            dst.scheduler.add_migrating(copy)
            self._wake(dst, t)

    def _transferred(self, t: float, req: Request, src: SimInstance, dst: SimInstance) -> None:
        assert isinstance(dst.scheduler, DecodeScheduler) and isinstance(
            src.scheduler, PrefillScheduler
        )
        spans.settle(dst, t)
        dst.scheduler.finish_migration(req.request_id, t)
        if dst.span is not None and not spans.join(self, dst, req, t):
            spans.cut(self, dst, t)
        src.scheduler.release_migrated(req.request_id, t)
        self._owner[req.request_id] = dst
        self._wake(src, t)
        self._wake(dst, t)
        self._dispatch(t)

    def _record(self, req: Request, t: float) -> None:
        res = self._results[req.request_id]
        first = self._first[req.request_id]
        n = req.num_output_tokens
        res.ttft, res.e2e, res.num_tokens = first - req.arrival_time, t - req.arrival_time, n
        res.tpot = (t - first) / (n - 1) if n > 1 else 0.0
        res.server = {k: v - req.arrival_time for k, v in req.timestamps.items()}
        res.cached_tokens = req.num_cached_tokens  # as the server's usage reports it
        self._owner.pop(req.request_id, None)
        if self.store is not None:
            self.store.release(req.request_id)
        if self.adaptive is not None:
            self.adaptive.finished(req, t)
        self._next_turn_due(req.request_id, t)
        if self._give_up is not None and self._give_up(res):
            self._stopped = True


_PROMPT_NAMES: dict[int, tuple[tuple[int, ...], SharedNames]] = {}
"""id of a workload's prompt (its token tuple) -> (the prompt, the block names of its
simulated requests); an entry holds its prompt, so the id stays that prompt's."""
_PROMPT_NAMES_KEPT = 20_000
"""Prompts kept at most (a long-lived process may simulate many workloads)."""


def _prompt_names(prompt: tuple[int, ...]) -> SharedNames:
    """The block names shared by every simulated request of `prompt` (this object), in
    every simulation in this process: a simulated request's tokens are its prompt and
    then `_TOKEN` only, so they are all prefixes of one sequence (share_names). A plan
    simulates one workload dozens of times: a block is hashed once, not once a run."""
    kept = _PROMPT_NAMES.get(id(prompt))
    if kept is None:
        if len(_PROMPT_NAMES) >= _PROMPT_NAMES_KEPT:
            _PROMPT_NAMES.clear()
        kept = _PROMPT_NAMES[id(prompt)] = (prompt, {})
    return kept[1]


def _chain_turns(workload: Workload) -> dict[str, Any]:
    """Request id of each turn of a session -> the session's next turn."""
    sessions: dict[int, list[Any]] = {}
    for wr in workload.requests:
        if wr.session is not None:
            sessions.setdefault(wr.session, []).append(wr)
    chain = {}
    for turns in sessions.values():
        turns.sort(key=lambda w: w.turn)
        for a, b in zip(turns, turns[1:], strict=False):
            chain[str(a.index)] = b
    return chain
