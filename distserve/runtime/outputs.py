"""From scheduler step outputs to what callers see: detokenized text with stop strings,
new tokens, finish reasons, timestamps. Shared by the offline engine and the controller."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from distserve.core import Request, StepOutput, TokenLogprobs
from distserve.model.tokenizer import Tokenizer
from distserve.runtime.detokenizer import IncrementalDetokenizer


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
    new_logprobs: list[TokenLogprobs] | None = None
    timestamps: dict[str, float] = field(default_factory=dict)
    num_cached_tokens: int = 0
    """Prompt tokens a prefix-cache hit supplied (`Request.num_cached_tokens`)."""


async def queued_outputs(
    queue: asyncio.Queue[RequestOutput | BaseException | None],
) -> AsyncIterator[RequestOutput]:
    """A request's outputs from its queue until its end (None); an exception put on the
    queue (the request failed) is raised."""
    while True:
        item = await queue.get()
        if item is None:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


class OutputProcessor:
    """Keeps one detokenizer per live request.

    `process` turns a step output into a RequestOutput and says whether a stop string
    was hit: then the caller must finish the request in its scheduler (reason 'stop')
    and call `finish` to flush the text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._prompts: dict[str, str | None] = {}

    def add(self, request_id: str, prompt: str | None, stop: tuple[str, ...]) -> None:
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, stop)
        self._prompts[request_id] = prompt

    def discard(self, request_id: str) -> None:
        self._detok.pop(request_id, None)
        self._prompts.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._detok

    def process(self, out: StepOutput) -> tuple[RequestOutput, bool]:
        """The new text of a step output; True if it hit a stop string."""
        req = out.request
        detok = self._detok[req.request_id]
        new_text = detok.add(out.new_token_ids)
        stop_hit = detok.stopped and not req.finished
        return self._output(req, new_text, out.new_token_ids, finished=req.finished), stop_hit

    def finish(self, req: Request, pending: RequestOutput | None = None) -> RequestOutput:
        """The request ended: release held-back text and forget it. `pending` is the
        output of its last step, if any, whose new text and tokens are kept."""
        detok = self._detok[req.request_id]
        tail = detok.flush()
        new_text = (pending.new_text if pending else "") + tail
        new_ids = pending.new_token_ids if pending else []
        out = self._output(req, new_text, new_ids, finished=True)
        self.discard(req.request_id)
        return out

    def _output(
        self, req: Request, new_text: str, new_ids: list[int], finished: bool
    ) -> RequestOutput:
        wants_lp = req.sampling_params.logprobs is not None
        lps: list[TokenLogprobs] = list(req.output_logprobs) if wants_lp else []  # type: ignore[arg-type]
        return RequestOutput(
            request_id=req.request_id,
            prompt=self._prompts.get(req.request_id),
            prompt_token_ids=req.prompt_token_ids,
            text=self._detok[req.request_id].text,
            token_ids=list(req.output_token_ids),
            new_text=new_text,
            new_token_ids=new_ids,
            finished=finished,
            finish_reason=req.finish_reason.value if req.finish_reason else None,
            logprobs=lps if wants_lp else None,
            new_logprobs=lps[len(lps) - len(new_ids) :] if wants_lp else None,
            timestamps=dict(req.timestamps),
            num_cached_tokens=req.num_cached_tokens,
        )
