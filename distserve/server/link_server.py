"""The controller's end of its links to API processes (server/api_processes.py).

Each API process holds one link. It asks (submit, abort, health, metrics, flip); the
controller answers, and relays the outputs of the requests that process submitted: every
output a loop iteration makes for that process's requests goes out as one message (an
instance step's tokens for all of them), not one per token. A link that closes (its
process died) aborts its requests, so their KV blocks are freed and nothing waits on them."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from distserve.cluster.controller import Overloaded, RequestFailed
from distserve.server import ipc
from distserve.server.frontend import LocalFrontend

log = logging.getLogger("distserve")


class _Sink:
    """A request's output queue on the controller's side: its items go to the link."""

    __slots__ = ("link", "request_id")

    def __init__(self, link: Link, request_id: str) -> None:
        self.link, self.request_id = link, request_id

    def put_nowait(self, item: Any) -> None:
        self.link.send_item(self.request_id, item)


class Link:
    """One API process's link: its requests, and the items waiting to be sent."""

    def __init__(self, frontend: LocalFrontend, writer: asyncio.StreamWriter) -> None:
        self.frontend, self.writer = frontend, writer
        self.requests: set[str] = set()
        self._items: list[tuple[Any, ...]] = []
        self._loop = asyncio.get_running_loop()
        self.closed = False

    def send_item(self, request_id: str, item: Any) -> None:
        if self.closed:
            return
        if item is None or isinstance(item, BaseException):
            self.requests.discard(request_id)
        if not self._items:  # the first of this loop iteration: send them all after it
            self._loop.call_soon(self._flush)
        self._items.append(ipc.encode_item(request_id, item))

    def _flush(self) -> None:
        items, self._items = self._items, []
        if items and not self.closed:
            self.writer.write(ipc.pack(("items", items)))

    def reply(self, call: int, ok: bool, value: Any) -> None:
        if not self.closed:
            self.writer.write(ipc.pack(("reply", call, ok, value)))

    def submit(self, call: int, prompts: list[Any], ids: list[str], n: int) -> None:
        queues = [_Sink(self, rid) for rid in ids]
        try:
            states = self.frontend.controller.submit_all(prompts, list(ids), n, queues)
        except ValueError as e:
            self.reply(call, False, ("value", str(e), 0))
        except Overloaded as e:
            self.reply(call, False, ("overloaded", str(e), e.retry_after))
        except RequestFailed as e:
            self.reply(call, False, ("failed", str(e), 0))
        else:
            self.requests.update(s.request_id for s in states)
            self.reply(call, True, None)

    async def call(self, call: int, name: str, args: tuple[Any, ...]) -> None:
        try:
            if name == "health":
                value: Any = await self.frontend.health()
            elif name == "metrics":
                value = await self.frontend.metrics_text()
            elif name == "flip":
                value = await self.frontend.flip(*args)
            else:
                raise ValueError(f"unknown call {name!r}")
        except ValueError as e:
            self.reply(call, False, ("value", str(e), 0))
        else:
            self.reply(call, True, value)

    def close(self) -> None:
        """The process is gone: abort what it submitted (frees their blocks)."""
        self.closed = True
        for rid in list(self.requests):
            self.frontend.abort(rid)
        self.requests.clear()


class LinkServer:
    """Accepts API processes' links on a Unix socket at `path`; the first message of a
    link asks for the `hello` settings it needs to build its app."""

    def __init__(self, frontend: LocalFrontend, path: str, hello: dict[str, Any]) -> None:
        self.frontend, self.path, self.hello = frontend, path, hello
        self.links: set[Link] = set()
        self.ready: asyncio.Queue[int] = asyncio.Queue()
        """The pid of each API process that reports its HTTP server listening."""
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = Link(self.frontend, writer)
        self.links.add(link)
        try:
            while True:
                msg = await ipc.read_message(reader)
                kind = msg[0]
                if kind == "submit":
                    link.submit(*msg[1:])
                elif kind == "abort":
                    link.requests.discard(msg[1])
                    self.frontend.abort(msg[1])
                elif kind == "call":
                    task = asyncio.ensure_future(link.call(*msg[1:]))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                elif kind == "hello":
                    writer.write(ipc.pack(("hello", self.hello)))
                elif kind == "ready":
                    self.ready.put_nowait(msg[1])
        except EOFError:
            pass
        except Exception:  # a bad message: drop this link, keep serving the others
            log.exception("an API process's link failed; its requests are aborted")
        finally:
            if link.requests:
                log.warning(
                    "an API process left with %d requests: they are aborted", len(link.requests)
                )
            link.close()
            self.links.discard(link)
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.writer.close()
