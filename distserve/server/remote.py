"""The routes' Frontend in an API process: requests go to the controller's process over
its link (server/link_server.py), and their outputs come back as deltas, one message per
controller loop iteration, which a reader task spreads over the requests' queues."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

from distserve.cluster.controller import Overloaded, RequestFailed
from distserve.core import SamplingParams
from distserve.model.tokenizer import Tokenizer
from distserve.runtime.outputs import RequestOutput, queued_outputs
from distserve.server import ipc


class RemoteRequest:
    """A request submitted from this process: its queue of outputs, rebuilt from deltas."""

    __slots__ = ("request_id", "queue", "acc", "ended")

    def __init__(self, request_id: str, prompt_ids: list[int], logprobs: bool) -> None:
        self.request_id = request_id
        self.queue: asyncio.Queue[RequestOutput | BaseException | None] = asyncio.Queue()
        self.acc = ipc.Accumulator(request_id, prompt_ids, logprobs)
        self.ended = False


class RemoteFrontend:
    """A Frontend whose controller runs in another process, reached by `reader`/`writer`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tokenizer: Tokenizer,
        max_model_len: int,
    ) -> None:
        self.reader, self.writer = reader, writer
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self.requests: dict[str, RemoteRequest] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        self.closed = asyncio.Event()
        """Set when the link to the controller closes: this process has nothing to serve."""

    async def run(self) -> None:
        """Read the link until it closes; then every open request fails."""
        try:
            while True:
                msg = await ipc.read_message(self.reader)
                if msg[0] == "items":
                    self._deliver(msg[1])
                elif msg[0] == "reply":
                    fut = self._calls.pop(msg[1], None)
                    if fut is not None and not fut.done():
                        fut.set_result((msg[2], msg[3]))
        except EOFError:
            pass
        finally:
            lost = RequestFailed("the server's controller stopped")
            for req in self.requests.values():
                req.queue.put_nowait(lost)
            self.requests.clear()
            for fut in self._calls.values():
                if not fut.done():
                    fut.set_result((False, ("failed", str(lost), 0)))
            self.closed.set()

    def _deliver(self, items: list[tuple[Any, ...]]) -> None:
        requests = self.requests
        for item in items:
            req = requests.get(item[0])
            if req is None:
                continue
            kind = item[1]
            if kind == ipc.OUTPUT:
                req.queue.put_nowait(req.acc.output(item))
            else:
                del requests[item[0]]
                req.ended = True
                req.queue.put_nowait(None if kind == ipc.END else RequestFailed(item[2]))

    async def _call(self, *msg: Any) -> Any:
        if self.closed.is_set():
            raise RequestFailed("the server's controller stopped")
        call = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call] = fut
        self.writer.write(ipc.pack((msg[0], call, *msg[1:])))
        ok, value = await fut
        if ok:
            return value
        kind, message, retry_after = value
        if kind == "value":
            raise ValueError(message)
        if kind == "overloaded":
            raise Overloaded(message, retry_after)
        raise RequestFailed(message)

    async def submit(
        self,
        prompts: list[tuple[str | list[int], SamplingParams]],
        request_ids: list[str],
        n: int,
    ) -> list[Any]:
        handles = []
        for i, rid in enumerate(request_ids):
            prompt, params = prompts[i // n]
            ids = prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt)
            handles.append(RemoteRequest(rid, ids, params.logprobs is not None))
        for h in handles:  # before the reply: outputs may follow it in the same read
            self.requests[h.request_id] = h
        try:
            await self._call("submit", prompts, request_ids, n)
        except BaseException:
            for h in handles:
                self.requests.pop(h.request_id, None)
            raise
        return handles

    def stream(self, handle: RemoteRequest) -> AsyncIterator[RequestOutput]:
        return queued_outputs(handle.queue)

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None and not self.closed.is_set():  # an ended one needs no word
            self.writer.write(ipc.pack(("abort", request_id)))
            req.queue.put_nowait(None)

    async def health(self) -> tuple[dict[str, Any], int]:
        body, code = await self._call("call", "health", ())
        return body, code

    async def metrics_text(self) -> bytes:
        text: bytes = await self._call("call", "metrics", ())
        return text

    async def flip(self, instance: str, role: str) -> dict[str, Any]:
        value: dict[str, Any] = await self._call("call", "flip", (instance, role))
        return value
