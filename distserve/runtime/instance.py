"""The step loop of one instance, run by the controller: the scheduler lives here, the
worker wherever its executor handle points."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from distserve.core import DecodeScheduler, Request, Scheduler, StepOutput, StepPlan
from distserve.core.prefix_cache import TokenSequence
from distserve.runtime.executor import Executor
from distserve.runtime.step_trace import StepTrace
from distserve.runtime.structured import Constraints
from distserve.runtime.worker.worker import WorkerInfo


class StoreWriter(Protocol):
    """What a step loop needs of the KV store's directory (core/kv_store.py KVStore):
    the copies that write a plan's new KV through to the store, and their commit."""

    def plan(
        self, plan: StepPlan, requests: Mapping[str, Request]
    ) -> tuple[StepPlan, list[Any]]: ...

    def commit(self, pending: list[Any]) -> None: ...

    def prefix_blocks(self, req: TokenSequence, first: int, limit: int) -> int: ...


log = logging.getLogger(__name__)


class Role(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"


@dataclass
class InstanceStats:
    """Counters the metrics endpoint reads."""

    steps: int = 0
    busy_seconds: float = 0.0
    tokens: int = 0
    back_to_back: int = 0
    """Steps that started as soon as the one before ended (no idle wait between)."""
    beyond_model_seconds: float = 0.0
    """Over those steps: the time from the step before's start to theirs beyond that
    step's time in its worker (the control plane's share of a busy instance's step:
    scheduling, the round trip, the outputs' relay)."""


class Instance:
    """One model replica: a scheduler, a worker, and the loop that joins them.

    Every step: (decode role) admit migrations whose blocks fit, then
    plan = schedule(now), result = await worker.execute(plan), update(plan, result, now),
    and hand the outputs to the controller. With nothing to do it sleeps until `wake()`.

    The outputs' processing (detokenizing, stop strings, the streams' queues) overlaps
    the next step: a step's outputs are handed over once the next step has been
    launched, so the worker computes while the controller relays (vLLM v1 overlaps the
    same way). A step's outputs wait only for that launch (its schedule(), well under a
    millisecond), and never past the instance's next sleep, pause, or failure. Outputs
    whose request has stop strings are handed over at once: a stop string, found in the
    detokenized text, ends the request before its next step is planned.
    """

    def __init__(
        self,
        name: str,
        role: Role,
        scheduler: Scheduler,
        executor: Executor,
        on_outputs: Callable[[Instance, list[StepOutput]], None],
        on_admitted: Callable[[Instance, list[Request]], None] | None = None,
        on_failure: Callable[[Instance, BaseException], None] | None = None,
        step_timeout: float = 300.0,
        cores: list[int] | None = None,
        trace: StepTrace | None = None,
    ) -> None:
        self.name, self.role = name, role
        self.cores = list(cores or [])
        self.pid: int | None = None
        """The worker's process id, when known (health output; fault tests)."""
        """The CPU cores its worker owns (kept to restart it on the same ones)."""
        self.trace = trace
        """Where each step is recorded (serve --trace-steps), if anywhere."""
        self.step_timeout = step_timeout
        """Seconds a step may take before the worker is declared hung (and failed)."""
        self.scheduler = scheduler
        self.executor = executor
        self.stats = InstanceStats()
        self._on_outputs = on_outputs
        self._on_admitted = on_admitted
        self._on_failure = on_failure
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.alive = True
        self.draining = False
        """Flipping its role (cluster/flip.py): finishes its work, takes no new work."""
        self.paused = False
        """Takes no step until unpaused (a flip swapping its scheduler)."""
        self.stepping = False
        """A step is in flight (its plan came from the current scheduler)."""
        self.info: WorkerInfo | None = None
        """What its worker reported at start (the block count a new scheduler needs)."""
        self.constraints: Constraints | None = None
        """Grammar matchers of its requests with a JSON schema (runtime/structured.py);
        None: such requests are sampled unconstrained."""
        self.store: StoreWriter | None = None
        """The KV store its steps write through to (core/kv_store.py), if any."""
        self._held: list[StepOutput] = []
        """The last step's outputs, handed over once the next step is launched."""
        self._last: tuple[float, float] | None = None
        """(start, worker time) of the step before, None after an idle wait."""

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"instance-{self.name}")

    def wake(self) -> None:
        """Something changed (new request, abort, migration): look for work again."""
        self._wakeup.set()

    async def stop(self) -> None:
        self.alive = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task  # stopping anyway: its end state no longer matters
        await self.executor.close()

    async def _run(self) -> None:
        try:
            while self.alive:
                if self.paused or not await self._step():
                    self._last = None
                    self._wakeup.clear()
                    self._hand_over()  # (after the clear: work it makes wakes us)
                    await self._wakeup.wait()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the worker died, hung, or a step failed
            log.exception("instance %s failed", self.name)
            self.fail(e)

    def fail(self, error: BaseException) -> None:
        """Declare the instance dead (once): its loop ends and the controller rescues its
        requests. Called by the loop itself or by the health watch."""
        if not self.alive:
            return
        self._hand_over()  # tokens already made reach their streams before the rescue
        self.alive = False
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        if self._on_failure is not None:
            self._on_failure(self, error)

    async def _step(self) -> bool:
        """One step; False when there was nothing to do."""
        if isinstance(self.scheduler, DecodeScheduler):
            admitted = self.scheduler.admit_migrations(time.monotonic())
            if admitted and self._on_admitted is not None:
                self._on_admitted(self, admitted)
        if self.store is not None:  # (again: a flip may have brought a new scheduler)
            self.scheduler.remote_prefix = self.store.prefix_blocks
        plan = self.scheduler.schedule(time.monotonic())
        if plan.empty:
            return False
        if self.constraints is not None:
            plan = self.constraints.apply(plan, self.scheduler.requests)
        pending = None
        if self.store is not None and (plan.chunks or plan.loads):
            plan, pending = self.store.plan(plan, self.scheduler.requests)
        t0 = time.perf_counter()
        if self._last is not None:
            self.stats.back_to_back += 1
            self.stats.beyond_model_seconds += t0 - self._last[0] - self._last[1]
        self.stepping = True
        try:
            async with asyncio.timeout(self.step_timeout):  # no task per step, as wait_for
                if self._held:
                    result = await self._overlapped(plan)
                else:
                    result = await self.executor.execute(plan)
        finally:
            self.stepping = False
        if pending and self.store is not None:
            self.store.commit(pending)
        if self.trace is not None:
            self.trace.record(self.name, self.role.value, t0, plan, result)
        self.stats.busy_seconds += time.perf_counter() - t0
        self.stats.steps += 1
        self._last = (t0, result.elapsed)
        self.stats.tokens += plan.num_tokens
        outputs = self.scheduler.update(plan, result, time.monotonic())
        if outputs:
            if self.draining or self.paused:
                self._on_outputs(self, outputs)
            else:
                urgent = [o for o in outputs if o.request.sampling_params.stop]
                self._held = [o for o in outputs if not o.request.sampling_params.stop]
                if urgent:
                    self._on_outputs(self, urgent)
        return True

    async def _overlapped(self, plan: StepPlan) -> Any:
        """Launch the step, hand over the last step's outputs while it runs, await it."""
        step = asyncio.ensure_future(self.executor.execute(plan))
        await asyncio.sleep(0)  # the step starts (its first await: a timer, a remote call)
        self._hand_over()
        return await step

    def _hand_over(self) -> None:
        held, self._held = self._held, []
        if held:
            self._on_outputs(self, held)
