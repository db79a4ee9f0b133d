"""The controller: one process that owns every scheduler, routes requests, streams their
tokens back and drives KV migrations between prefill and decode workers."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Protocol

from distserve.cluster.placement import connect_peers, start_workers
from distserve.cluster.process_group import KVProcessGroup, join_process_group
from distserve.config import EngineConfig, PlacementConfig
from distserve.core import (
    BlockManager,
    ColocatedScheduler,
    DecodeScheduler,
    FinishReason,
    PrefillScheduler,
    Request,
    SamplingParams,
    Scheduler,
    StepOutput,
)
from distserve.core.routing import pick_decode, pick_prefill
from distserve.model.metadata import load_tokenizer
from distserve.model.registry import resolve
from distserve.runtime.engine import check_token_ids
from distserve.runtime.executor import Executor
from distserve.runtime.instance import Instance, Role
from distserve.runtime.outputs import OutputProcessor, RequestOutput
from distserve.runtime.transport import TransferStats, check_transport, transfer_blocks
from distserve.runtime.worker import WorkerInfo

log = logging.getLogger(__name__)


class Observer(Protocol):
    """Hooks for metrics; the server's Prometheus exporter implements them."""

    def on_first_token(self, ttft: float) -> None: ...
    def on_finished(self, outcome: str, tpot: float | None) -> None: ...
    def on_migration(self, stats: TransferStats) -> None: ...


class RequestFailed(RuntimeError):
    """A request could not be served (its instance failed); the message says why."""


@dataclasses.dataclass
class RequestState:
    """The controller's view of one live request. `owner` is the instance whose
    scheduler holds it for prefill (or for everything, colocated); `decode` the decode
    instance that has taken it over or will."""

    request_id: str
    queue: asyncio.Queue[RequestOutput | BaseException | None]
    owner: Instance
    decode: Instance | None = None
    migrating: bool = False
    aborted: bool = False
    first_token_at: float | None = None


class Controller:
    """Starts the workers of a placement and runs every instance's step loop."""

    def __init__(
        self,
        engine: EngineConfig,
        placement: PlacementConfig,
        *,
        use_ray: bool = True,
        ray_address: str | None = None,
        observer: Observer | None = None,
        migration_timeout: float = 30.0,
        start_timeout: float = 300.0,
        transport: str = "auto",
    ) -> None:
        check_transport(transport, use_ray, engine.device)
        self.engine_config, self.placement = engine, placement
        self.use_ray, self.ray_address = use_ray, ray_address
        self.observer = observer
        self.migration_timeout, self.start_timeout = migration_timeout, start_timeout
        self.transport = transport
        """How KV migrates between Ray workers (runtime/transport.py): auto copies out of a
        mapped peer cache on one node and pulls through the object store across nodes."""
        self.migrations: collections.Counter[str] = collections.Counter()
        """Completed migrations per transport used (TransferStats.transport)."""
        self._group: KVProcessGroup | None = None
        self.instances: list[Instance] = []
        self._requests: dict[str, RequestState] = {}
        self._awaiting: deque[tuple[RequestState, Request]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count()
        self.model_config, self.tokenizer = load_tokenizer(
            resolve(engine.model, engine.load_format)
        )
        self.outputs = OutputProcessor(self.tokenizer)
        self.max_model_len = min(
            engine.scheduler.max_model_len, self.model_config.max_position_embeddings
        )

    # ---- life cycle ---------------------------------------------------------------
    async def start(self) -> None:
        executors = await start_workers(
            self.engine_config, self.placement, self.use_ray, self.ray_address, self.start_timeout
        )
        infos = list(await asyncio.gather(*(e.info() for e in executors)))
        try:
            await self._connect(executors, infos)
        except BaseException:
            await asyncio.gather(*(e.close() for e in executors), return_exceptions=True)
            raise
        counts: dict[str, int] = {}
        for role_name, executor, info in zip(self.placement.roles, executors, infos, strict=True):
            role = Role(role_name)
            index = counts[role_name] = counts.get(role_name, -1) + 1
            inst = Instance(
                f"{role.value}-{index}", role, self._scheduler(role, info), executor,
                self._on_outputs, self._on_admitted, self._on_failure,
            )  # fmt: skip
            self.instances.append(inst)
            inst.start()

    async def _connect(self, executors: list[Executor], infos: list[WorkerInfo]) -> None:
        """Set up the chosen transport between the started workers."""
        t, roles = self.transport, self.placement.roles
        await connect_peers(executors, roles, infos, t in ("auto", "shm"), required=t == "shm")
        if t in ("gloo", "nccl"):
            self._group = await join_process_group(executors, infos, t, self.migration_timeout)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(i.stop() for i in self.instances), return_exceptions=True)
        if self._group is not None:  # the workers have left (or died): drop the store
            self._group.close()
            self._group = None
        for state in list(self._requests.values()):
            state.queue.put_nowait(RequestFailed("the server is shutting down"))
        self._requests.clear()

    def _scheduler(self, role: Role, info: WorkerInfo) -> Scheduler:
        sched_cfg = dataclasses.replace(
            self.engine_config.scheduler,
            max_model_len=self.max_model_len,
            chunked_prefill=self.placement.chunked_prefill and role == Role.COLOCATED,
        )
        cc = self.engine_config.cache
        blocks = BlockManager(info.num_blocks, cc.block_size, cc.watermark)
        swap = BlockManager(cc.num_swap_blocks, cc.block_size) if cc.num_swap_blocks else None
        cls = {
            Role.PREFILL: PrefillScheduler,
            Role.DECODE: DecodeScheduler,
            Role.COLOCATED: ColocatedScheduler,
        }[role]
        return cls(sched_cfg, blocks, swap)

    # ---- requests -----------------------------------------------------------------
    @property
    def entry_instances(self) -> list[Instance]:
        return [i for i in self.instances if i.role != Role.DECODE]

    @property
    def decode_instances(self) -> list[Instance]:
        return [i for i in self.instances if i.role == Role.DECODE]

    def submit(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestState:
        """Queue a request on the least-loaded prefill instance. Raises ValueError for a
        request that can never run (too long, bad token ids, duplicate id)."""
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_token_ids(ids, self.model_config.vocab_size)
        req = Request(rid, ids, params, time.monotonic(), eos_token_id=self.tokenizer.eos_token_id)
        for dec in self.decode_instances[:1]:
            dec.scheduler.check_request(req)  # the decode side must be able to hold it too
        inst = pick_prefill(self.entry_instances)
        if inst is None:
            raise RequestFailed("no live instance can take requests")
        inst.scheduler.add_request(req)
        state = RequestState(rid, asyncio.Queue(), inst)
        self._requests[rid] = state
        self.outputs.add(rid, text, params.stop)
        inst.wake()
        return state

    async def stream(self, state: RequestState) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come; raises RequestFailed if it cannot finish."""
        while True:
            item = await state.queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def abort(self, request_id: str) -> None:
        """Stop a request (client gone) and free its blocks on every instance holding
        them. During a KV transfer the blocks are freed when the transfer returns, so no
        late write can land in blocks that were handed to someone else."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return
        state.aborted = True
        self.outputs.discard(request_id)
        if not state.migrating:
            self._release_everywhere(state)
        state.queue.put_nowait(None)
        if self.observer:
            self.observer.on_finished("abort", None)

    def _release_everywhere(self, state: RequestState) -> None:
        now = time.monotonic()
        for inst in (state.owner, state.decode):
            if inst is not None:
                inst.scheduler.abort_request(state.request_id, now)
                inst.wake()

    # ---- callbacks from instance loops ----------------------------------------------
    def _on_outputs(self, inst: Instance, outputs: list[StepOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            req = out.request
            state = self._requests.get(req.request_id)
            if state is None:
                continue
            ro, stop_hit = self.outputs.process(out)
            if state.first_token_at is None:
                state.first_token_at = now
                if self.observer:
                    self.observer.on_first_token(now - req.arrival_time)
            if stop_hit:
                inst.scheduler.finish_request(req.request_id, FinishReason.STOP, now)
            if req.finished:
                self._finish(state, self.outputs.finish(req, ro))
                continue
            state.queue.put_nowait(ro)
            if inst.role == Role.PREFILL:
                self._awaiting.append((state, req))
        self._dispatch_migrations()

    def _finish(self, state: RequestState, out: RequestOutput) -> None:
        self._requests.pop(state.request_id, None)
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
            self.observer.on_finished(out.finish_reason or "stop", tpot)

    def _dispatch_migrations(self) -> None:
        """Hand prefilled requests, oldest first, to decode instances that can queue them."""
        while self._awaiting:
            state, req = self._awaiting[0]
            if state.aborted or req.finished:
                self._awaiting.popleft()
                continue
            dec = pick_decode(self.decode_instances)
            if dec is None:
                return
            self._awaiting.popleft()
            copy = dataclasses.replace(
                req,
                output_token_ids=list(req.output_token_ids),
                output_logprobs=list(req.output_logprobs),
                timestamps=dict(req.timestamps),
            )
            assert isinstance(dec.scheduler, DecodeScheduler)
            dec.scheduler.add_migrating(copy)
            state.decode = dec
            dec.wake()

    def _on_admitted(self, dec: Instance, requests: list[Request]) -> None:
        for req in requests:
            state = self._requests.get(req.request_id)
            if state is None:  # aborted while queued: drop the blocks just allocated
                dec.scheduler.abort_request(req.request_id, time.monotonic())
                continue
            state.migrating = True
            task = asyncio.create_task(self._migrate(state, dec, req))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _migrate(self, state: RequestState, dec: Instance, req: Request) -> None:
        """Pull the KV of `req` from its prefill instance into `dec`; on success the decode
        side takes over and only then does the prefill side free its blocks."""
        src_inst, rid = state.owner, req.request_id
        src = src_inst.scheduler.blocks.block_table(rid)
        dst = dec.scheduler.blocks.block_table(rid)[: len(src)]
        assert isinstance(dec.scheduler, DecodeScheduler) and isinstance(
            src_inst.scheduler, PrefillScheduler
        )
        try:
            stats = await asyncio.wait_for(
                transfer_blocks(src_inst.executor, src, dec.executor, dst), self.migration_timeout
            )
        except Exception:  # the transfer failed or timed out: retry later, or clean up
            log.exception("migration of %s from %s to %s failed", rid, src_inst.name, dec.name)
            state.migrating = False
            if state.aborted:
                self._release_everywhere(state)
            else:
                dec.scheduler.fail_migration(rid, time.monotonic())
                dec.wake()
            return
        state.migrating = False
        now = time.monotonic()
        if state.aborted:
            self._release_everywhere(state)
            return
        dec.scheduler.finish_migration(rid, now)
        src_inst.scheduler.release_migrated(rid, now)
        state.owner, state.decode = dec, None
        self.migrations[stats.transport] += 1
        if self.observer:
            self.observer.on_migration(stats)
        src_inst.wake()
        dec.wake()
        self._dispatch_migrations()

    def _on_failure(self, inst: Instance, error: BaseException) -> None:
        """An instance's worker failed: its requests end with an error (recovery by
        re-prefill is the reliability layer's job)."""
        for state in list(self._requests.values()):
            if inst in (state.owner, state.decode):
                self._requests.pop(state.request_id, None)
                self.outputs.discard(state.request_id)
                for other in (state.owner, state.decode):
                    if other is not None and other is not inst:
                        other.scheduler.abort_request(state.request_id, time.monotonic())
                        other.wake()
                state.queue.put_nowait(RequestFailed(f"instance {inst.name} failed: {error}"))
