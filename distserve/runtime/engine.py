"""One colocated instance in one process, stepped by its caller: the offline `LLM`,
tests and benchmarks run on it. Serving uses the same worker and scheduler pieces."""

from __future__ import annotations

import dataclasses
import itertools
import time

from distserve.config import EngineConfig
from distserve.core import BlockManager, ColocatedScheduler, FinishReason, Request, SamplingParams
from distserve.core.request import check_token_ids
from distserve.model.loader import LoadedModel
from distserve.runtime.outputs import OutputProcessor, RequestOutput
from distserve.runtime.structured import Constraints
from distserve.runtime.worker.worker import Worker

__all__ = ["LLMEngine", "RequestOutput"]


class LLMEngine:
    """A colocated scheduler and an in-process worker; `step()` runs one iteration."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.worker = Worker(config, list(config.cores) if config.cores else None, loaded)
        info = self.worker.info()
        self.loaded = self.worker.loaded
        self.tokenizer = self.loaded.tokenizer
        sched = config.scheduler
        if sched.max_model_len > info.model_config.max_position_embeddings:
            sched = dataclasses.replace(
                sched, max_model_len=info.model_config.max_position_embeddings
            )
        self.config = dataclasses.replace(config, scheduler=sched)
        cc = config.cache
        swap = BlockManager(cc.num_swap_blocks, cc.block_size) if cc.num_swap_blocks else None
        blocks = BlockManager(
            info.num_blocks,
            cc.block_size,
            cc.watermark,
            prefix_caching=cc.prefix_caching,
            cache_key=config.prefix_cache_key,
        )
        self.scheduler = ColocatedScheduler(sched, blocks, swap)
        self.outputs = OutputProcessor(self.tokenizer)
        self.constraints = Constraints(self.tokenizer)
        self._ids = itertools.count()

    @property
    def runner(self):  # type: ignore[no-untyped-def]
        return self.worker.runner

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler.max_model_len

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Tokenize (if text) and queue a request; raises ValueError if it cannot run."""
        request_id = request_id or f"req-{next(self._ids)}"
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_token_ids(ids, self.loaded.config.vocab_size)
        now = time.monotonic() if arrival_time is None else arrival_time
        req = Request(request_id, ids, params, now, eos_token_id=self.tokenizer.eos_token_id)
        self.scheduler.add_request(req)
        self.outputs.add(request_id, text, params.stop)
        return request_id

    def abort(self, request_id: str) -> None:
        self.scheduler.abort_request(request_id, time.monotonic())
        self.outputs.discard(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return an output for every request that progressed."""
        plan = self.scheduler.schedule(time.monotonic())
        if plan.empty:
            return []
        plan = self.constraints.apply(plan, self.scheduler.requests)
        result = self.worker.execute(plan)
        results = []
        for out in self.scheduler.update(plan, result, time.monotonic()):
            ro, stop_hit = self.outputs.process(out)
            if stop_hit:
                self.scheduler.finish_request(
                    out.request.request_id, FinishReason.STOP, time.monotonic()
                )
            if out.request.finished:
                ro = self.outputs.finish(out.request, ro)
            results.append(ro)
        return results
