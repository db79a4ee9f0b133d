"""The controller's side of an emulated device: an `EmulatedWorker` (see
runtime/worker/emulated.py) driven from the controller's event loop, and the links that
KV migrates over between emulated nodes."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from distserve.core import StepPlan, StepResult
from distserve.runtime.worker.emulated import EmulatedDevice, EmulatedWorker
from distserve.runtime.worker.worker import WorkerInfo


@dataclass(frozen=True)
class Links:
    """The emulated cluster's links: KV bytes per second within a node and across."""

    intra_node: float
    inter_node: float


class EmulatedExecutor:
    """An emulated worker (`runtime/worker/emulated.py`) driven from the controller's event
    loop: a step does the worker's bookkeeping, then sleeps until the latency model's time
    has passed since the step began (the emulator's own cost is inside that time, not
    added to it). A KV pull from another emulated worker sleeps for the blocks' bytes over
    the link between their nodes. Sleeping costs no thread and no process, so dozens of
    emulated devices fit in one controller; the price is that no Ray round trip is made
    per step (see docs/architecture.md, "Emulated devices")."""

    kind = "emulated"

    def __init__(self, device: EmulatedDevice, links: Links) -> None:
        self.worker = EmulatedWorker(device)
        self.links = links
        self.lock = asyncio.Lock()
        self.clock = WakeClock()
        """Times its steps (and says how close to their deadlines they ended)."""
        self.transfer_clock = WakeClock()

    def restarted(self) -> EmulatedExecutor:
        """A fresh worker on the same device (after this one died): empty KV cache."""
        return EmulatedExecutor(self.worker.device, self.links)

    async def info(self) -> WorkerInfo:
        return self.worker.info()

    async def ping(self) -> int:
        return self.worker.ping()

    async def execute(self, plan: StepPlan) -> StepResult:
        async with self.lock:
            t0 = time.perf_counter()
            result = self.worker.execute(plan)
            await self.clock.sleep_until(t0 + result.elapsed)
            return result

    async def read_blocks(self, block_ids: list[int]) -> list[Any]:
        return self.worker.read_blocks(block_ids)

    async def write_blocks(self, block_ids: list[int], data: Any) -> int:
        return self.worker.write_blocks(block_ids, data)

    async def pull_from(
        self, src: EmulatedExecutor, src_blocks: list[int], dst_blocks: list[int]
    ) -> int:
        """Copy blocks of `src` into ours in the time their KV bytes take on the link
        between the two nodes; returns the bytes. It does not wait for a step (the blocks
        belong to the migrating request, not to the step)."""
        t0 = time.perf_counter()
        num_bytes = len(src_blocks) * self.worker.device.bytes_per_block
        same = src.worker.device.node == self.worker.device.node
        bandwidth = self.links.intra_node if same else self.links.inter_node
        overhead = self.worker.device.latency.path.transfer_overhead
        data = src.worker.read_blocks(src_blocks)
        await self.transfer_clock.sleep_until(t0 + overhead + num_bytes / bandwidth)
        src.worker.ping()  # a source that died meanwhile fails the pull
        return self.worker.write_blocks(dst_blocks, data)

    async def close(self) -> None:
        pass


class WakeClock:
    """Sleeps until a deadline, waking early by the timer's usual lateness: the event loop
    wakes a timer ~0.5-1 ms late (epoll waits in whole milliseconds), which would add
    that much to every emulated step; waking early by its running mean leaves each step
    within a fraction of a millisecond of its deadline and exact on average.

    Only the timer's granularity is made up for: a wake-up later than `max_lead` (the
    loop was busy: the controller's own cost, which a real device would make it pay too)
    counts as `max_lead`, and the lead never exceeds it, so a congested loop can never
    make a step end early."""

    def __init__(self, lead: float = 0.0005, max_lead: float = 0.001, smoothing: float = 0.1):
        self.lead = lead
        """Seconds a sleep is cut short by: the running mean of the timer's lateness."""
        self.max_lead = max_lead
        self.smoothing = smoothing
        self.num_sleeps = 0
        self.error = 0.0
        """Woken minus deadline, summed over sleeps (> 0: late)."""
        self.abs_error = 0.0

    async def sleep_until(self, deadline: float) -> None:
        wake = deadline - self.lead
        delay = wake - time.perf_counter()
        if delay <= 0:  # the step's time has passed already (or nearly: within the lead)
            return
        await asyncio.sleep(delay)
        now = time.perf_counter()
        late = min(now - wake, self.max_lead)
        self.lead += self.smoothing * (late - self.lead)
        self.num_sleeps += 1
        self.error += now - deadline
        self.abs_error += abs(now - deadline)
