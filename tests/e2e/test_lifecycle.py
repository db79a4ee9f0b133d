"""The server's processes against the outside world and against its own death: every
socket of the default `serve` (the API, Ray's GCS, raylet, agents and workers) listens on
loopback only; SIGKILL of the API process drops its clients' connections and leaves no
process and no shared-memory segment of ours behind, so a new `serve` on the same port
starts at once (with RAY_ADDRESS pointing elsewhere: without --ray-address it starts a
cluster of its own)."""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from distserve.bench.server_process import running_server

pytestmark = pytest.mark.slow  # starts real servers (Ray actors, the real model)

MODEL = "smollm2-135m"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_process(port: int) -> psutil.Process:
    """The `serve` process that listens on `port` (a child of this test process)."""
    for child in psutil.Process().children():
        try:
            if any(c.laddr.port == port for c in child.net_connections("tcp")):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no child of this process listens on port {port}")


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def _exposed(tree: list[psutil.Process]) -> list[str]:
    """Every socket of these processes that listens (TCP) or is bound (UDP) beyond
    loopback."""
    found = []
    for p in tree:
        try:
            conns = p.net_connections("inet")
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            listening = c.status == psutil.CONN_LISTEN or c.type == socket.SOCK_DGRAM
            if listening and c.laddr and not _is_loopback(c.laddr.ip):
                found.append(f"{p.name()} (pid {p.pid}) on {c.laddr.ip}:{c.laddr.port}")
    return found


def _alive(pids: list[int]) -> list[int]:
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def _describe(pids: list[int]) -> list[str]:
    """What a left-over process is, for the failure message."""
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            marked = "DISTSERVE_REAP_TOKEN" in p.environ()
            out.append(f"{pid} {p.status()} marked={marked}: {' '.join(p.cmdline())[:200]}")
        except psutil.Error as e:
            out.append(f"{pid}: {e!r}")
    return out


def _stream_until_dropped(url: str, started: threading.Event, outcome: list[str]) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000,
            "ignore_eos": True, "stream": True}  # fmt: skip
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for _ in r.iter_lines():
                started.set()
        outcome.append("ended")
    except httpx.TransportError as e:
        outcome.append(f"dropped: {type(e).__name__}")


def test_loopback_only_and_nothing_left_after_sigkill(monkeypatch: pytest.MonkeyPatch) -> None:
    port = _free_port()
    with running_server("--port", str(port)) as url:
        assert urlsplit(url).port == port
        api = _server_process(port)
        tree = [api, *api.children(recursive=True)]
        assert len(tree) > 3, tree  # Ray's GCS, raylet, agents and workers
        assert _exposed(tree) == []
        pids = [p.pid for p in tree]

        started, outcome = threading.Event(), []
        client = threading.Thread(target=_stream_until_dropped, args=(url, started, outcome))
        client.start()
        assert started.wait(120)
        api.kill()
        client.join(60)
        assert outcome and outcome[0].startswith("dropped"), outcome

        deadline = time.monotonic() + 30  # generous: the reaper takes well under a second
        while _alive(pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _alive(pids)
        assert left == [], _describe(left)
        ours = [f for f in os.listdir("/dev/shm") if any(f"-{pid}-" in f for pid in pids)]
        assert ours == []

    # The same port, at once; and without --ray-address, serve starts a cluster of its own
    # even where RAY_ADDRESS points elsewhere (as after `ray start`): ray.init used to join
    # that address and then refuse the num_cpus it was given.
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_free_port()}")  # nothing listens there
    with running_server("--port", str(port), "--mode", "disagg") as again:
        r = httpx.post(
            again + "/v1/completions",
            json={"model": MODEL, "prompt": "Hello", "max_tokens": 4},
            timeout=120,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
