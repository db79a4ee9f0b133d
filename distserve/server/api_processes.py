"""HTTP API processes apart from the controller's (`serve --api-servers N`).

The controller's process binds the listening socket and starts N processes that share
it (the kernel hands each new connection to one of them). Each runs the same routes over
a RemoteFrontend linked to the controller (server/link_server.py): it parses and checks
requests, tokenizes prompts, and writes every SSE chunk, so the per-token HTTP work is
off the event loop that runs the instances' step loops. A process that dies is started
again; the requests it held are aborted (their clients' connections went with it).

Run as `python -m distserve.server.api_processes LINK_PATH FD` by the controller only."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from typing import Any

log = logging.getLogger("distserve")

READY_TIMEOUT = 120.0
"""Seconds an API process may take to start listening."""


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) and listening, to hand to the API processes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock  # not inheritable: only the API processes get it (pass_fds)


class ApiProcesses:
    """Starts `count` API processes on `sock`, linked at `link_path`, and keeps them up.
    `ready` yields each started process's pid once its HTTP server listens."""

    def __init__(
        self, count: int, link_path: str, sock: socket.socket, ready: asyncio.Queue[int]
    ) -> None:
        self.count, self.link_path, self.sock, self.ready = count, link_path, sock, ready
        self.procs: list[asyncio.subprocess.Process] = []
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False
        self._started = False
        self._failed: int | None = None
        """The exit status of a process that died before all were listening."""

    async def start(self) -> None:
        """Start them all; returns once each listens (RuntimeError if one cannot)."""
        for i in range(self.count):
            self.procs.append(await self._spawn())
            self._watchers.append(asyncio.create_task(self._watch(i)))
        pids: set[int] = set()
        deadline = asyncio.get_running_loop().time() + READY_TIMEOUT
        while len(pids) < self.count:
            if self._failed is not None:
                raise RuntimeError(f"an API process exited with {self._failed} as it started")
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(
                    f"{self.count - len(pids)} API processes did not start listening "
                    f"within {READY_TIMEOUT:.0f} s"
                )
            with contextlib.suppress(TimeoutError):
                pids.add(await asyncio.wait_for(self.ready.get(), 0.5))
        self._started = True

    async def _spawn(self) -> asyncio.subprocess.Process:
        fd = self.sock.fileno()
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "distserve.server.api_processes",
            self.link_path,
            str(fd),
            pass_fds=(fd,),
            # a session of its own: a terminal's Ctrl-C reaches the controller's process
            # alone, which stops these in turn (were they to stop first, it would start
            # them again); if it dies, they see the link close and stop
            start_new_session=True,
        )

    async def _watch(self, i: int) -> None:
        """Start process `i` again whenever it dies, until `stop`."""
        while True:
            code = await self.procs[i].wait()
            if self._stopping:
                return
            if not self._started:  # it cannot start: no point starting it again
                self._failed = code
                return
            log.warning("API process %d (pid %d) exited with %s: starting another", i,
                        self.procs[i].pid, code)  # fmt: skip
            await asyncio.sleep(0.5)
            if self._stopping:
                return
            self.procs[i] = await self._spawn()

    async def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM each (it stops accepting, finishes its responses and exits); SIGKILL
        what is left after `timeout` s."""
        self._stopping = True
        for p in self.procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        waits = [p.wait() for p in self.procs]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout)
        except TimeoutError:
            for p in self.procs:
                if p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            await asyncio.gather(*(p.wait() for p in self.procs))
        for w in self._watchers:
            w.cancel()
        self.sock.close()


async def start_http(
    frontend: Any, settings: dict[str, Any], sock: socket.socket
) -> tuple[Any, asyncio.Task[None]] | None:
    """The routes over `frontend` served on `sock` by uvicorn, with `settings` (model_name,
    api_key, max_body_bytes, body_timeout, header_timeout, max_connections); returns the
    server and its task once it listens, None if it stopped first."""
    import uvicorn

    from distserve.server.app import build_app
    from distserve.server.limits import head_deadline_protocol

    app = build_app(
        frontend, settings["model_name"], settings["api_key"], settings["max_body_bytes"],
        settings["body_timeout"],
    )  # fmt: skip
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        http=head_deadline_protocol(settings["header_timeout"]),
        limit_concurrency=settings["max_connections"],
    )
    httpd = uvicorn.Server(config)
    task = asyncio.create_task(httpd.serve(sockets=[sock]))
    while not httpd.started and not task.done():
        await asyncio.sleep(0.02)
    if task.done():
        task.result()
        return None
    return httpd, task


async def _serve(link_path: str, fd: int) -> None:
    from distserve.server import ipc
    from distserve.server.remote import RemoteFrontend

    reader, writer = await asyncio.open_unix_connection(link_path, limit=1 << 22)
    writer.write(ipc.pack(("hello",)))
    hello: dict[str, Any] = (await ipc.read_message(reader))[1]
    frontend = RemoteFrontend(reader, writer, hello["tokenizer"], hello["max_model_len"])
    reading = asyncio.create_task(frontend.run())
    stop = asyncio.Event()  # SIGTERM, from the controller's process
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    # uvicorn (>= 0.29) stops on SIGTERM itself too
    started = await start_http(frontend, hello, socket.socket(fileno=fd))
    if started is None:
        return
    httpd, task = started
    gc.collect()
    gc.freeze()  # as the controller's process does: startup objects out of the scans
    writer.write(ipc.pack(("ready", os.getpid())))
    closed = asyncio.create_task(frontend.closed.wait())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({closed, stopping, task}, return_when=asyncio.FIRST_COMPLETED)
    httpd.should_exit = True
    await task
    writer.close()
    reading.cancel()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m distserve.server.api_processes LINK_PATH FD", file=sys.stderr)
        return 2
    asyncio.run(_serve(argv[0], int(argv[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
