"""The controller: one process that owns every scheduler, routes requests, streams their
tokens back and drives KV migrations between prefill and decode workers."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Protocol

from distserve.cluster.adaptive import Adaptive, AdaptiveConfig
from distserve.cluster.choices import MAX_CHOICES, Held, HeldChoices, sibling
from distserve.cluster.decode_prefill import DecodePrefillConfig, decode_prefill_rule
from distserve.cluster.degraded import Degraded
from distserve.cluster.drain import DrainRate
from distserve.cluster.emulation import EmulatedCluster
from distserve.cluster.flip import FlipRecord, Flips
from distserve.cluster.live import Finished, LiveWindow
from distserve.cluster.local_ray import RayLink
from distserve.cluster.migration import Migrations
from distserve.cluster.placement import (
    connect_peers,
    instance_cores,
    reinit_ray,
    replace_worker,
    start_workers,
)
from distserve.cluster.process_group import KVProcessGroup, join_process_group
from distserve.cluster.recovery import Recovery
from distserve.cluster.request_table import RequestState, RequestTable
from distserve.cluster.store_link import StoreLink
from distserve.config import EmulationConfig, EngineConfig, PlacementConfig
from distserve.core import (
    BlockManager,
    ColocatedScheduler,
    DecodeScheduler,
    FinishReason,
    PrefillScheduler,
    Request,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    StepOutput,
)
from distserve.core.request import check_token_ids
from distserve.core.routing import pick_prefill
from distserve.model.metadata import load_tokenizer
from distserve.model.registry import resolve
from distserve.runtime.executor import Executor
from distserve.runtime.instance import Instance, Role
from distserve.runtime.outputs import OutputProcessor, RequestOutput, queued_outputs
from distserve.runtime.step_trace import StepTrace
from distserve.runtime.structured import Constraints
from distserve.runtime.transport import TransferStats, check_transport
from distserve.runtime.worker.worker import WorkerInfo

log = logging.getLogger(__name__)


class Observer(Protocol):
    """Hooks for metrics; the server's Prometheus exporter implements them."""

    def on_first_token(self, ttft: float, role: str = "") -> None: ...
    def on_finished(
        self, outcome: str, tpot: float | None, done: RequestOutput | None = None, role: str = ""
    ) -> None: ...
    def on_migration(self, stats: TransferStats) -> None: ...


class RequestFailed(RuntimeError):
    """A request could not be served; the message says why."""


class Overloaded(RuntimeError):
    """Too much is queued already: the client should retry in `retry_after` seconds
    (HTTP 429)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Controller:
    """Starts the workers of a placement and runs every instance's step loop."""

    def __init__(
        self,
        engine: EngineConfig,
        placement: PlacementConfig,
        *,
        use_ray: bool = True,
        ray_address: str | None = None,
        ray_loopback: bool = True,
        observer: Observer | None = None,
        migration_timeout: float = 30.0,
        start_timeout: float = 300.0,
        transport: str = "auto",
        max_queued: int = 512,
        restart: bool = True,
        orphan_timeout: float = 300.0,
        step_trace: str | None = None,
        emulation: EmulationConfig | None = None,
        live: LiveWindow | None = None,
        adaptive: AdaptiveConfig | None = None,
        degrade_after: float | None = 10.0,
        kv_store_gb: float = 0.0,
        kv_store_disk: tuple[float, str | None] = (0.0, None),
        prefill_on_decode: DecodePrefillConfig | None = None,
    ) -> None:
        check_transport(transport, use_ray, engine.device)
        if kv_store_gb and emulation is not None:
            raise ValueError("--kv-store-gb: emulated devices hold no KV bytes to store")
        self.kv_store_gb = kv_store_gb
        self.kv_store_disk = kv_store_disk
        """GiB and directory of the store's disk tier (serve --kv-store-disk-gb/-dir)."""
        self.store: StoreLink | None = None
        """The KV store (cluster/store_link.py), once started, when kv_store_gb > 0."""
        if emulation is not None and transport != "auto":
            raise ValueError(f"emulated devices have their own links, not transport {transport!r}")
        self.step_trace = StepTrace(step_trace) if step_trace else None
        """One JSON line per step of every instance, when asked for (serve --trace-steps)."""
        self.engine_config, self.placement = engine, placement
        self.use_ray, self.ray_address = use_ray, ray_address
        self.ray_loopback = ray_loopback
        """A local Ray cluster (no ray_address) listens on 127.0.0.1 only."""
        self.observer = observer
        self.migration_timeout, self.start_timeout = migration_timeout, start_timeout
        self.transport = transport
        """How KV migrates between Ray workers (runtime/transport.py): auto copies out of a
        mapped peer cache on one node and pulls through the object store across nodes."""
        self._group: KVProcessGroup | None = None
        self.table = RequestTable()
        """Live requests, the queues they wait in, and the instances by role."""
        self.load_seconds = 0.0
        """The slowest worker's own start (model load, packing, KV cache), once started."""
        self.kernel_rows: list[int | None] = []
        """Per worker, up to how many rows it takes the packed kernels (WorkerInfo)."""
        self.max_queued = max_queued
        """Prompts that may wait for prefill at once; beyond, submit raises Overloaded."""
        self.drain = DrainRate()
        """How fast prompts leave the prefill queues: an overloaded client's Retry-After."""
        on_migration = observer.on_migration if observer else None
        self.migration = Migrations(self.table, self.spawn, migration_timeout, on_migration)
        self.live = live or LiveWindow()
        """What arrives and what it attains, over a sliding window (cluster/live.py)."""
        self.adaptive = Adaptive(self, adaptive) if adaptive is not None else None
        """Re-plans the layout on the live window and flips roles (cluster/adaptive.py)."""
        self.flips = Flips(self.table, lambda inst, role: self._scheduler(role, inst.info))
        self.degraded = (
            Degraded(self.table, self.flips, degrade_after) if degrade_after is not None else None
        )
        """Covers for a role that stays down (cluster/degraded.py); None: requests wait."""
        self.recovery = Recovery(
            self.table, self.spawn, self._replacement, self.fail_request,
            orphan_timeout=orphan_timeout, restart=restart,
            cluster=RayLink(ray_address, reinit_ray) if use_ray and emulation is None else None,
        )  # fmt: skip
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count()
        self.held = HeldChoices()
        """Choices 1..n-1 of a prompt, waiting for choice 0's prefill (cluster/choices.py)."""
        self.emulated = (
            EmulatedCluster(engine, placement, emulation) if emulation is not None else None
        )
        """The emulated devices every instance runs on (serve --emulate), if any."""
        self.model_config, self.tokenizer = (
            (self.emulated.model_config, self.emulated.tokenizer)
            if self.emulated is not None
            else load_tokenizer(resolve(engine.model, engine.load_format))
        )
        self.outputs = OutputProcessor(self.tokenizer)
        self.max_model_len = min(
            engine.scheduler.max_model_len, self.model_config.max_position_embeddings
        )
        if prefill_on_decode is not None and placement.mode == "disagg":
            self.table.prefill_on_decode = decode_prefill_rule(
                prefill_on_decode, engine.model, placement, self.emulated
            )  # short prompts may be prefilled by their decode instance (core/routing.py)

    # ---- life cycle ---------------------------------------------------------------
    async def start(self) -> None:
        executors = await start_workers(
            self.engine_config,
            self.placement,
            self.use_ray,
            self.ray_address,
            self.start_timeout,
            self.emulated,
            self.ray_loopback,
        )
        infos = list(await asyncio.gather(*(e.info() for e in executors)))
        self.load_seconds = max((i.load_seconds for i in infos), default=0.0)
        self.kernel_rows = [i.kernel_rows for i in infos]
        try:
            await self._connect(executors, infos)
        except BaseException:
            await asyncio.gather(*(e.close() for e in executors), return_exceptions=True)
            raise
        cores = (
            instance_cores(self.placement, self.engine_config.device)
            if self.emulated is None
            else [[] for _ in executors]  # emulated devices own no cores
        )
        if self.kv_store_gb > 0:
            self._open_store()
        counts: dict[str, int] = {}
        for i, (role_name, executor, info) in enumerate(
            zip(self.placement.roles, executors, infos, strict=True)
        ):
            index = counts[role_name] = counts.get(role_name, -1) + 1
            inst = self.make_instance(
                f"{role_name}-{index}", Role(role_name), executor, info, cores[i]
            )
            if self.store is not None:
                await self.store.attach(inst)
            self.table.instances.append(inst)
            inst.start()
        self.spawn(self.recovery.watch())
        if self.adaptive is not None:
            self.spawn(self.adaptive.run())
        if self.degraded is not None and self.placement.mode == "disagg":
            self.spawn(self.degraded.watch())

    def _open_store(self) -> None:
        store = self.store = StoreLink(
            self.engine_config, self.model_config, self.kv_store_gb, self.use_ray,
            *self.kv_store_disk,
        )  # fmt: skip
        self.migration.store = store.directory
        self.recovery.resume = lambda dead, state, req: store.resume(dead, state, req, self.table)

    def make_instance(
        self, name: str, role: Role, executor: Executor, info: WorkerInfo, cores: list[int]
    ) -> Instance:
        inst = Instance(
            name, role, self._scheduler(role, info), executor, self._on_outputs,
            self.migration.on_admitted, self.recovery.on_failure, cores=cores,
            trace=self.step_trace,
        )  # fmt: skip
        inst.pid, inst.info = info.pid, info
        inst.constraints = Constraints(self.tokenizer)  # JSON schemas (runtime/structured.py)
        return inst

    async def _replacement(self, dead: Instance) -> Instance:
        """A new worker in place of a dead one (same name, role and cores), connected to
        the live decode workers; its instance is not started yet."""
        decoders = [i.executor for i in self.instances if i.alive and i.role == Role.DECODE]
        executor, info = await replace_worker(
            self.engine_config, self.placement, dead.role.value, dead.cores, self.use_ray,
            self.start_timeout, dead.executor, decoders, self.transport in ("auto", "shm"),
        )  # fmt: skip
        inst = self.make_instance(dead.name, dead.role, executor, info, dead.cores)
        if self.store is not None:
            await self.store.attach(inst)
        return inst

    async def flip(self, name: str, role: str) -> FlipRecord:
        """Turn instance `name` to `role` (prefill, decode, colocated) without reloading its
        model (cluster/flip.py); ValueError for a flip that cannot be made."""
        inst = next((i for i in self.instances if i.name == name), None)
        if inst is None:
            names = ", ".join(i.name for i in self.instances)
            raise ValueError(f"no instance {name!r} (instances: {names})")
        try:
            new = Role(role)
        except ValueError:
            raise ValueError(f"role must be prefill, decode or colocated, got {role!r}") from None
        return await self.flips.flip(inst, new)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a background task the controller owns (cancelled on stop)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, executors: list[Executor], infos: list[WorkerInfo]) -> None:
        """Set up the chosen transport between the started workers."""
        t, roles = self.transport, self.placement.roles
        await connect_peers(executors, roles, infos, t in ("auto", "shm"), required=t == "shm")
        if t in ("gloo", "nccl"):
            self._group = await join_process_group(executors, infos, t, self.migration_timeout)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.adaptive is not None:
            self.adaptive.close()
        await asyncio.gather(*(i.stop() for i in self.instances), return_exceptions=True)
        if self._group is not None:  # the workers have left (or died): drop the store
            self._group.close()
            self._group = None
        states = list(self.table.requests.values()) + [h.state for h in self.held.all()]
        for state in states:
            state.queue.put_nowait(RequestFailed("the server is shutting down"))
        self.table.requests.clear()
        self.held.clear()
        if self.step_trace is not None:
            self.step_trace.close()
        if self.store is not None:
            self.store.close()

    def scheduler_config(self, role: Role) -> SchedulerConfig:
        """The scheduler config a new instance of `role` starts with (a flip's too)."""
        return dataclasses.replace(
            self.engine_config.scheduler,
            max_model_len=self.max_model_len,
            chunked_prefill=self.placement.chunked_prefill and role == Role.COLOCATED,
        )

    def _scheduler(self, role: Role, info: WorkerInfo) -> Scheduler:
        sched_cfg = self.scheduler_config(role)
        cc = self.engine_config.cache
        # A fresh cache for every worker: a restarted one holds none of its KV.
        blocks = BlockManager(
            info.num_blocks,
            cc.block_size,
            cc.watermark,
            prefix_caching=cc.prefix_caching,
            cache_key=self.engine_config.prefix_cache_key,
        )
        swap = BlockManager(cc.num_swap_blocks, cc.block_size) if cc.num_swap_blocks else None
        cls = {
            Role.PREFILL: PrefillScheduler,
            Role.DECODE: DecodeScheduler,
            Role.COLOCATED: ColocatedScheduler,
        }[role]
        return cls(sched_cfg, blocks, swap)

    # ---- requests -----------------------------------------------------------------
    @property
    def instances(self) -> list[Instance]:
        """Every instance, by start order (a restarted one takes its predecessor's place)."""
        return self.table.instances

    def submit(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestState:
        """Queue a request on the least-loaded prefill instance. Raises ValueError for a
        request that can never run (too long, bad token ids, duplicate id)."""
        return self.submit_all([(prompt, params)], [request_id])[0]

    def submit_all(
        self,
        prompts: list[tuple[str | list[int], SamplingParams]],
        request_ids: list[str | None] | None = None,
        n: int = 1,
        queues: list[Any] | None = None,
    ) -> list[RequestState]:
        """Queue several requests, all or none: each is checked (ValueError, as `submit`),
        and the prefill queues must have room for all (Overloaded), before any is admitted;
        a batch with one bad prompt starts nothing. With `n` > 1 each prompt becomes `n`
        requests (its choices, cluster/choices.py) that share the prompt's KV blocks; the
        states, `request_ids` and `queues` (if given) run prompt by prompt, choice by choice.
        A request's outputs go to its queue: an asyncio.Queue of its own by default, or
        anything with `put_nowait` (server/link_server.py relays them to an API process)."""
        if not 1 <= n <= MAX_CHOICES:
            raise ValueError(f"n must be in [1, {MAX_CHOICES}], got {n}")
        count = len(prompts) * n
        rids = [r or f"req-{next(self._ids)}" for r in request_ids or [None] * count]
        if len(rids) != count:
            raise ValueError(f"{len(rids)} request ids for {count} choices")
        for i, rid in enumerate(rids):
            if rid in self.table.requests or rid in self.held or rid in rids[:i]:
                raise ValueError(f"request id {rid!r} is already in use")
        entry = self.table.entry_instances
        checked = []
        for j, (p, params) in enumerate(prompts):
            leader, text = self._check(p, params, rids[j * n])
            checked.append((leader, text))
            checked += [(sibling(leader, rids[j * n + k], k), text) for k in range(1, n)]
        queued = (
            sum(len(i.scheduler.waiting) for i in entry) + len(self.table.orphans) + len(self.held)
        )
        excess = queued + len(checked) - self.max_queued
        if excess > 0:
            wait = self.drain.retry_after(excess, time.monotonic())
            raise Overloaded(
                f"{queued} prompts are already waiting for prefill; retry in {wait} s", wait
            )
        restarting = self.recovery.restart_enabled and bool(entry)
        if pick_prefill(entry) is None and not restarting:
            raise RequestFailed("no live instance can take requests")
        if queues is not None and len(queues) != count:
            raise ValueError(f"{len(queues)} queues for {count} choices")
        qs = queues or [asyncio.Queue() for _ in range(count)]
        states: list[RequestState] = []
        for i, (req, text) in enumerate(checked):
            if i % n == 0:
                states.append(self._admit(req, text, qs[i]))
            else:
                states.append(self._hold(states[i - i % n], req, text, qs[i]))
        return states

    def _check(
        self, prompt: str | list[int], params: SamplingParams, rid: str
    ) -> tuple[Request, str | None]:
        """The request a prompt becomes, if every instance that would hold it can."""
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_token_ids(ids, self.model_config.vocab_size)
        req = Request(rid, ids, params, time.monotonic(), eos_token_id=self.tokenizer.eos_token_id)
        for inst in self.table.entry_instances[:1] + self.table.decode_instances[:1]:
            inst.scheduler.check_request(req)
        return req, text

    def _admit(self, req: Request, text: str | None, queue: Any) -> RequestState:
        self.live.on_arrival(req.arrival_time, req)
        entry = self.table.entry_instances
        inst = self.table.route(req)  # load changes with each request admitted
        state = RequestState(req.request_id, queue, inst or entry[0])
        self.table.requests[req.request_id] = state
        self.outputs.add(req.request_id, text, req.sampling_params.stop)
        if inst is None:
            # every entry instance is down and being restarted: the request waits for one,
            # as a rescued request does (bounded by max_queued and the orphan timeout)
            self.table.orphans.append((time.monotonic(), state, req))
        else:
            inst.scheduler.add_request(req)
            inst.wake()
        return state

    def _hold(
        self, leader: RequestState, req: Request, text: str | None, queue: Any
    ) -> RequestState:
        """A later choice of `leader`'s prompt: streamable now, queued once the leader's
        prompt KV is in the prefix cache (at once if there is no prefix cache)."""
        if not self.engine_config.cache.prefix_caching:
            return self._admit(req, text, queue)
        state = RequestState(req.request_id, queue, leader.owner)
        self.outputs.add(req.request_id, text, req.sampling_params.stop)
        self.held.hold(leader.request_id, Held(state, req))
        return state

    def _release_choices(self, leader_id: str, inst: Instance | None) -> None:
        """Queue the choices waiting for `leader_id`: on `inst`, the instance that holds
        the leader's prompt KV, if it takes prompts and lives; else where routing says."""
        for held in self.held.release(leader_id):
            state, req = held.state, held.request
            self.table.requests[req.request_id] = state
            target = (
                inst
                if inst is not None and inst.alive and inst.role != Role.DECODE
                else pick_prefill(self.table.entry_instances)
            )
            if target is None:
                self.table.orphans.append((time.monotonic(), state, req))
            else:
                self.table.place(state, req, target)

    def stream(self, state: RequestState) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come; raises RequestFailed if it cannot finish."""
        return queued_outputs(state.queue)

    def abort(self, request_id: str) -> None:
        """Stop a request (client gone) and free its blocks on every instance holding
        them. During a KV transfer the blocks are freed when the transfer returns, so no
        late write can land in blocks that were handed to someone else. A choice waiting
        for its leader just ends; the choices waiting for an aborted leader are queued."""
        held = self.held.drop(request_id)
        state = held.state if held is not None else self.table.requests.pop(request_id, None)
        if state is None:
            return
        self._release_choices(request_id, None)
        self.live.forget(request_id)
        state.aborted = True
        self.outputs.discard(request_id)
        if not state.migrating:
            self.table.release_everywhere(state)
        if self.store is not None and not (state.migrating and state.from_store):
            self.store.release(request_id)  # a pull from the store releases it when it ends
        state.queue.put_nowait(None)
        if self.observer:
            self.observer.on_finished("abort", None)

    # ---- callbacks from instance loops ----------------------------------------------
    def _on_outputs(self, inst: Instance, outputs: list[StepOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            req = out.request
            state = self.table.requests.get(req.request_id)
            if state is None:
                continue
            ro, stop_hit = self.outputs.process(out)
            if state.first_token_at is None:
                state.first_token_at = now
                self._release_choices(req.request_id, inst)  # its prompt KV is cached now
                self.drain.record(now)
                if self.observer:
                    self.observer.on_first_token(now - req.arrival_time, inst.role.value)
            if stop_hit:
                inst.scheduler.finish_request(req.request_id, FinishReason.STOP, now)
            if req.finished:
                self._record_live(state, req, now)
                self._finish(state, self.outputs.finish(req, ro), inst.role.value)
                continue
            state.queue.put_nowait(ro)
            if inst.role == Role.PREFILL:
                self.table.awaiting.append((state, req))
        self.table.dispatch()

    def _record_live(self, state: RequestState, req: Request, now: float) -> None:
        n = len(req.output_token_ids)
        first = state.first_token_at
        self.live.on_finished(
            Finished(
                req.arrival_time,
                tuple(req.prompt_token_ids),
                n,
                None if first is None else first - req.arrival_time,
                (now - first) / (n - 1) if first is not None and n > 1 else None,
            ),
            now,
        )

    def _finish(self, state: RequestState, out: RequestOutput, role: str = "") -> None:
        self.table.requests.pop(state.request_id, None)
        self.live.forget(state.request_id)
        if self.store is not None:
            self.store.release(state.request_id)
        state.queue.put_nowait(out)
        state.queue.put_nowait(None)
        if self.observer:
            ts = out.timestamps
            n = len(out.token_ids)
            tpot = (
                (ts["finished"] - state.first_token_at) / (n - 1)
                if n > 1 and state.first_token_at
                else None
            )
            self.observer.on_finished(out.finish_reason or "stop", tpot, out, role)

    def fail_request(self, state: RequestState, reason: str) -> None:
        """End a request with an error its client sees (the stream raises RequestFailed)."""
        self.table.requests.pop(state.request_id, None)
        self.live.forget(state.request_id)
        self.outputs.discard(state.request_id)
        self.table.release_everywhere(state)
        if self.store is not None and not (state.migrating and state.from_store):
            self.store.release(state.request_id)
        self._release_choices(state.request_id, None)
        state.queue.put_nowait(RequestFailed(reason))
        if self.observer:
            self.observer.on_finished("error", None)
