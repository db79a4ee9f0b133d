"""Limits on what a client may hold open: a deadline for a request's head (the HTTP
protocol), a size limit and a deadline for its body (ASGI middleware).

uvicorn waits for a head or a body for as long as the client cares to send it, and reads
a chunked body (no Content-Length) whole; a few slow clients would then hold connections
and memory without end. The cap on open connections is uvicorn's own `limit_concurrency`
(503 beyond it), and a connection that sends no head counts against it only until its
head deadline.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from distserve.server.errors import error_response

if TYPE_CHECKING:
    from uvicorn.protocols.http.h11_impl import H11Protocol

Message = dict[str, Any]


def head_deadline_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request head is not whole
    within `seconds` of the connection (or of the first byte of a later request on it):
    it gets 408 and is closed."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    closing = error_response(408, f"the request head did not arrive within {seconds:g} s")
    reply = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
        % (len(closing.body), bytes(closing.body))
    )

    class HeadDeadline(H11Protocol):
        head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.head_timer = self.loop.call_later(seconds, self._expire)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is whole
                self._disarm()
            elif self.head_timer is None:  # the first bytes of a head on a kept connection
                self.head_timer = self.loop.call_later(seconds, self._expire)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _disarm(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _expire(self) -> None:
            self.head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.write(reply)
                self.transport.close()

    return HeadDeadline


class BodyLimits:
    """ASGI middleware: a body over `max_bytes` gets 413 as soon as that many bytes have
    arrived (by its Content-Length, or as a chunked body streams in), and a body not whole
    within `timeout` seconds of its head gets 408. Either way the connection is closed and
    the route, if it was reading, sees the client disconnect."""

    def __init__(self, app: Any, max_bytes: int, timeout: float) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guard = _BodyGuard(scope, receive, send, self.max_bytes, self.timeout)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await guard.refuse(413, guard.too_large, "body_too_large")
            return
        await self.app(scope, guard.receive, guard.send)


class _BodyGuard:
    """One request's receive and send, counted and timed until its body is whole."""

    def __init__(self, scope: Message, receive: Any, send: Any, max_bytes: int, timeout: float):
        self.scope, self._receive, self._send = scope, receive, send
        self.max_bytes = max_bytes
        self.too_large = f"request body over {max_bytes} bytes"
        self.deadline = asyncio.get_running_loop().time() + timeout
        self.timeout = timeout
        self.num_bytes = 0
        self.body_done = False
        self.started = False
        self.refused = False

    async def receive(self) -> Message:
        if self.refused:
            return {"type": "http.disconnect"}
        if self.body_done:  # later receives wait for a disconnect: no deadline on those
            return await self._receive()  # type: ignore[no-any-return]
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(max(remaining, 0.001)):  # not wait_for: see recovery.py
                message: Message = await self._receive()
        except asyncio.TimeoutError:
            await self.refuse(408, f"the request body did not arrive within {self.timeout:g} s")
            return {"type": "http.disconnect"}
        if message["type"] == "http.request":
            self.num_bytes += len(message.get("body", b""))
            if self.num_bytes > self.max_bytes:
                await self.refuse(413, self.too_large, "body_too_large")
                return {"type": "http.disconnect"}
            self.body_done = not message.get("more_body", False)
        return message

    async def send(self, message: Message) -> None:
        if self.refused:
            return  # answered already; the route's own reply to the disconnect goes nowhere
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)

    async def refuse(self, status: int, message: str, code: str | None = None) -> None:
        """Answer `status` (unless the route has started its reply) and close."""
        self.refused = True
        if self.started:
            return
        response = error_response(status, message, code=code)
        response.headers["connection"] = "close"  # the rest of the body is never read
        await response(self.scope, self._receive, self._send)
