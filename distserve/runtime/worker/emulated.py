"""An emulated worker: `Worker`'s interface with no model behind it, so the real runtime
(controller, routing, migration, server) can run at a GPU cluster's scale on a CPU.

It keeps the KV capacity its profile gives, says how long each step takes by the same
latency model the simulator uses (one definition of a step's cost), and samples from a
fixed token stream. It also records which request's KV each block holds and checks,
at every step, that a request reads blocks holding its own KV: a migration that copied
the wrong blocks, or a block freed too early and reused, fails the step as a real
model would silently compute garbage.

    block:  [ r7:0 | r7:1 | r7:2 | r2:0 | -- | r7:3 ... ]   kv[b]: who wrote block b last,
                                                            and at which block index
    chunk of r7 at start s: block of position s-1 must say r7; blocks of [s, s+n) get r7

A prefix-cache hit reads full blocks another request wrote: a chunk that starts on a
block boundary may read a block of another writer if that writer filled it at the same
index (the worker cannot see the tokens behind it; the scheduler's names vouch for them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from distserve.core import StepPlan, StepResult
from distserve.core.plan import ScheduledChunk, TokenLogprobs
from distserve.model.config import ModelConfig
from distserve.runtime.worker.worker import WorkerInfo
from distserve.sim.latency import LatencyModel


@dataclass(frozen=True)
class EmulatedDevice:
    """What one emulated worker is: its latency model, KV capacity and place."""

    latency: LatencyModel
    """Step and migration costs (`sim/latency.py`); its profile has the instance's tp and
    pipeline stages."""
    num_blocks: int
    block_size: int
    model_config: ModelConfig
    tokens: tuple[int, ...]
    """The token stream: output i of every request is tokens[i % len(tokens)]."""
    node: int
    """Index of the emulated node it runs on (migrations within a node are faster)."""
    devices: tuple[int, ...] = ()
    """The emulated devices it occupies on its node (tp x pp of them)."""

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("an emulated worker needs a non-empty token stream")
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")

    @property
    def bytes_per_block(self) -> int:
        """The model's real KV bytes in one block (what a migration moves)."""
        return self.block_size * self.latency.kv_bytes_per_token


Owner = tuple[str, int]
"""What an emulated block holds: (request id, block index in that request's sequence)."""


class KVMismatch(RuntimeError):
    """A step read blocks that do not hold its request's KV."""


class EmulatedWorker:
    """Executes plans by bookkeeping only; `execute` returns at once with the latency
    model's time in `elapsed`, and its executor (`EmulatedExecutor`) waits that long."""

    def __init__(self, device: EmulatedDevice) -> None:
        self.device = device
        self.kv: list[Owner | None] = [None] * device.num_blocks
        """Per block: the request whose KV it holds (the last writer) and the block's
        index in that request's sequence."""
        self.host: dict[int, Owner | None] = {}
        """Swapped-out blocks, by host block."""
        self.killed = False
        """Set by `kill` (fault tests): every later call raises, as a dead actor's does."""
        self.info_ = WorkerInfo(
            num_blocks=device.num_blocks,
            block_size=device.block_size,
            bytes_per_block=device.bytes_per_block,
            model_config=device.model_config,
            cores=(),
            pid=os.getpid(),
            load_seconds=0.0,
            node=f"emulated-node-{device.node}",
        )

    def info(self) -> WorkerInfo:
        return self.info_

    def ping(self) -> int:
        self._check_alive()
        return os.getpid()

    def kill(self) -> None:
        self.killed = True

    def execute(self, plan: StepPlan) -> StepResult:
        self._check_alive()
        for d, h in plan.swap_out:
            self.host[h] = self.kv[d]
        for h, d in plan.swap_in:
            self.kv[d] = self.host.pop(h, None)
        for s, d in plan.block_copies:
            self.kv[d] = self.kv[s]
        tokens, logprobs = self.device.tokens, {}
        sampled = {}
        for c in plan.chunks:
            self._write(c)
            if c.sampling_params is None:
                continue
            token = tokens[c.output_index % len(tokens)]
            sampled[c.request_id] = token
            if c.sampling_params.logprobs is not None:
                top = ((token, 0.0),) if c.sampling_params.logprobs else ()
                logprobs[c.request_id] = TokenLogprobs(token, 0.0, top)
        return StepResult(sampled, logprobs, self.device.latency.step_time(plan))

    def _write(self, c: ScheduledChunk) -> None:
        """Check that the chunk's context is its request's KV, then mark its own blocks.
        Plans without block tables (the simulator's) are not checked."""
        if not c.block_table:
            return
        bs, rid = self.device.block_size, c.request_id
        if c.start > 0:
            i = (c.start - 1) // bs
            b = c.block_table[i]
            owner = self.kv[b]
            shared = c.start % bs == 0 and owner is not None and owner[1] == i
            if (owner is None or owner[0] != rid) and not shared:
                raise KVMismatch(
                    f"{rid} at position {c.start} reads block {b}, which holds the KV of "
                    f"{owner[0] if owner else None!r}"
                )
        for i in range(c.start // bs, (c.context_len - 1) // bs + 1):
            self.kv[c.block_table[i]] = (rid, i)

    def read_blocks(self, block_ids: list[int]) -> list[Owner | None]:
        """What the blocks hold (their owners), as a migration carries it."""
        self._check_alive()
        return [self.kv[b] for b in block_ids]

    def write_blocks(self, block_ids: list[int], data: list[Owner | None]) -> int:
        """Store what another emulated worker's `read_blocks` returned; returns the KV
        bytes those blocks stand for."""
        self._check_alive()
        if len(block_ids) != len(data):
            raise ValueError(f"{len(data)} blocks of data for {len(block_ids)} block ids")
        for b, owner in zip(block_ids, data, strict=True):
            self.kv[b] = owner
        return len(block_ids) * self.device.bytes_per_block

    def _check_alive(self) -> None:
        if self.killed:
            raise RuntimeError("the emulated worker was killed")
