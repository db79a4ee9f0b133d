"""One instance in one process: scheduler + model runner + tokenizer, stepped in a loop.
The offline `LLM` runs on it; serving instances wrap the same pieces."""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field

from distserve.config import EngineConfig
from distserve.core import (
    BlockManager,
    ColocatedScheduler,
    FinishReason,
    Request,
    SamplingParams,
    Scheduler,
    TokenLogprobs,
)
from distserve.model.loader import DTYPES, LoadedModel, load
from distserve.model.registry import resolve
from distserve.runtime.detokenizer import IncrementalDetokenizer
from distserve.runtime.kv_cache import KVCache, num_blocks_for
from distserve.runtime.model_runner import ModelRunner
from distserve.runtime.threads import pin_to_cores


@dataclass
class RequestOutput:
    """The state of a request after a step: all its text so far, and what is new."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    new_text: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None
    timestamps: dict[str, float] = field(default_factory=dict)


class LLMEngine:
    """A colocated instance stepped by its caller (the offline API, tests, benchmarks)."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        if config.device == "cpu":
            pin_to_cores(list(config.cores) if config.cores else None)
        self.loaded = loaded or load(
            resolve(config.model, config.load_format), config.dtype, config.device, config.seed
        )
        self.tokenizer = self.loaded.tokenizer
        mcfg = self.loaded.config
        sched_cfg = config.scheduler
        if sched_cfg.max_model_len > mcfg.max_position_embeddings:
            sched_cfg = dataclasses.replace(sched_cfg, max_model_len=mcfg.max_position_embeddings)
        cc = config.cache
        dtype = DTYPES[config.dtype]
        num_blocks = cc.num_blocks or num_blocks_for(mcfg, cc.kv_cache_gb, cc.block_size, dtype)
        self.cache = KVCache(
            mcfg, num_blocks, cc.block_size, dtype, config.device, cc.num_swap_blocks
        )
        swap = BlockManager(cc.num_swap_blocks, cc.block_size) if cc.num_swap_blocks else None
        self.scheduler: Scheduler = ColocatedScheduler(
            sched_cfg, BlockManager(num_blocks, cc.block_size, cc.watermark), swap
        )
        self.runner = ModelRunner(self.loaded.model, self.cache, config.seed)
        self.config = dataclasses.replace(config, scheduler=sched_cfg)
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._prompts: dict[str, str | None] = {}
        self._ids = itertools.count()

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
        if isinstance(prompt, str):
            ids, text = self.tokenizer.encode(prompt), prompt
        else:
            ids, text = list(prompt), None
        vocab = self.loaded.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        now = time.monotonic() if arrival_time is None else arrival_time
        req = Request(request_id, ids, params, now, eos_token_id=self.tokenizer.eos_token_id)
        self.scheduler.add_request(req)
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, params.stop)
        self._prompts[request_id] = text
        return request_id

    def abort(self, request_id: str) -> None:
        self.scheduler.abort_request(request_id, time.monotonic())
        self._detok.pop(request_id, None)
        self._prompts.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return an output for every request that progressed."""
        plan = self.scheduler.schedule(time.monotonic())
        if plan.empty:
            return []
        result = self.runner.execute(plan)
        outputs = []
        for out in self.scheduler.update(plan, result, time.monotonic()):
            req = out.request
            detok = self._detok[req.request_id]
            new_text = detok.add(out.new_token_ids)
            if detok.stopped and not req.finished:
                self.scheduler.finish_request(req.request_id, FinishReason.STOP, time.monotonic())
            if req.finished:
                new_text += detok.flush()
                del self._detok[req.request_id]
            outputs.append(self._output(req, detok, new_text, out.new_token_ids))
        return outputs

    def _output(
        self, req: Request, detok: IncrementalDetokenizer, new_text: str, new_ids: list[int]
    ) -> RequestOutput:
        prompt = (
            self._prompts.pop(req.request_id, None)
            if req.finished
            else self._prompts.get(req.request_id)
        )
        return RequestOutput(
            request_id=req.request_id,
            prompt=prompt,
            prompt_token_ids=req.prompt_token_ids,
            text=detok.text,
            token_ids=list(req.output_token_ids),
            new_text=new_text,
            new_token_ids=new_ids,
            finished=req.finished,
            finish_reason=req.finish_reason.value if req.finish_reason else None,
            logprobs=list(req.output_logprobs)
            if req.sampling_params.logprobs is not None
            else None,  # type: ignore[arg-type]
            timestamps=dict(req.timestamps),
        )
