"""Issue 27: losing the Ray cluster. The raylet of the server's own cluster killed under
load is tests/e2e/test_faults.py's last test (it shares that module's server); its
helpers are here. A cluster joined with --ray-address that goes away is joined again, retried
with backoff until it answers (on emulated devices with a stand-in for the cluster: no Ray
cluster of its own to lose here)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from typing import Any, cast

import httpx
import psutil
import pytest

from distserve.cluster import local_ray
from distserve.cluster.recovery import ClusterLost
from distserve.config import PlacementConfig
from distserve.core import SamplingParams
from tests.e2e.test_emulated import assert_all_blocks_free, emulated
from tests.e2e.test_recovery import outcome

ORPHAN_TIMEOUT = 60
"""serve --orphan-timeout: how long a request may wait for a role with no live instance."""
LONG = SamplingParams(max_tokens=400, ignore_eos=True, temperature=0)
"""Emulated requests that are still decoding when the cluster goes (~30 steps a second)."""


def _server(url: str) -> psutil.Process:
    port = int(url.rsplit(":", 1)[1])
    pid = next(
        c.pid
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid
    )
    return psutil.Process(pid)


def _raylets(server: psutil.Process) -> list[int]:
    """The live raylets among the server's descendants (its embedded cluster's)."""
    found = []
    for p in server.children(recursive=True):
        try:
            argv = p.cmdline()
        except psutil.Error:  # gone, or a zombie (the killed raylet until Ray collects it)
            continue
        if argv and os.path.basename(argv[0]) == "raylet":
            found.append(p.pid)
    return found


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (/proc/PID/status SigCgt)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(ln.split()[1], 16) for ln in f if ln.startswith("SigCgt:"))
    return bool(mask >> (sig - 1) & 1)


def _health(url: str) -> httpx.Response:
    return httpx.get(url + "/health", timeout=10)


def _wait_new_workers(url: str, old: set[int], timeout: float) -> dict[str, Any]:
    """/health once it is 200 with none of the `old` worker pids; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = _health(url)
        if r.status_code == 200 and not old & {v["pid"] for v in r.json()["instances"].values()}:
            return cast(dict[str, Any], r.json()["instances"])
        time.sleep(1)
    raise AssertionError(f"not healthy on a new cluster within {timeout} s: {r.text}")


class JoinedCluster:
    """A cluster joined with --ray-address, as recovery sees it (local_ray.RayLink): it
    goes when told to, and answers a reconnect only after `unreachable` failed tries."""

    def __init__(self, unreachable: int) -> None:
        self.down = False
        self.unreachable = unreachable
        self.tries = 0

    closes_lost_workers = False

    async def gone(self, now: bool = False) -> str | None:
        return "the Ray cluster at 10.0.0.1:6379 is gone" if self.down else None

    async def reconnect(self) -> None:
        if not self.down:
            return
        self.tries += 1
        if self.tries <= self.unreachable:
            raise ConnectionError("could not connect to 10.0.0.1:6379")
        self.down = False


def test_a_lost_joined_cluster_is_joined_again_with_backoff() -> None:
    async def run() -> None:
        controller = emulated(PlacementConfig(mode="disagg"))
        cluster = JoinedCluster(unreachable=2)
        controller.recovery.cluster = cluster
        await controller.start()
        try:
            recovery = controller.recovery
            states = [controller.submit(f"request {i} " * 20, LONG) for i in range(4)]
            tasks = [asyncio.create_task(outcome(controller, s)) for s in states]
            await asyncio.sleep(0.3)  # ~10 decode steps in
            cluster.down = True
            await asyncio.sleep(1.5)  # seen within a ping period: every instance failed
            assert not any(i.alive for i in controller.instances)
            assert "ConnectionError" in recovery.restart_errors["decode-0"]
            outs = await asyncio.wait_for(asyncio.gather(*tasks), 30)
            stream = controller.emulated.tokens  # type: ignore[union-attr]
            for out in outs:  # rescued on the cluster joined again: nothing lost
                assert out == [stream[i % len(stream)] for i in range(400)]
            assert cluster.tries == 3 and recovery.restarts == 2
            assert all(i.alive for i in controller.instances)
            assert not recovery.restart_errors and not recovery.restart_attempts
            assert_all_blocks_free(controller)
        finally:
            await controller.stop()

    asyncio.run(run())


def test_a_restart_under_way_is_abandoned_when_the_cluster_goes() -> None:
    """A try that waits for a worker on a cluster that is gone ends at once (ClusterLost)
    instead of waiting out the start timeout."""

    async def run() -> None:
        controller = emulated(PlacementConfig(mode="disagg"))
        cluster = JoinedCluster(unreachable=0)
        controller.recovery.cluster = cluster
        await controller.start()
        try:
            recovery, dead = controller.recovery, controller.instances[1]
            never = asyncio.Event()

            async def pending(_: object) -> object:  # a worker the cluster never starts
                await never.wait()
                raise AssertionError("unreachable")

            recovery.replace = pending  # type: ignore[assignment]
            attempt = asyncio.create_task(recovery._try_replace(dead))
            await asyncio.sleep(0.1)
            assert not attempt.done()
            cluster.down = True
            with pytest.raises(ClusterLost, match="is gone"):
                await asyncio.wait_for(attempt, 10)
        finally:
            await controller.stop()

    asyncio.run(run())


def test_a_lost_local_cluster_is_ended_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `serve` does with its own cluster once the raylet is gone, on real processes
    (no Ray): the loss is seen from the raylet's process, and the old cluster's reaper
    (told by SIGUSR1) ends what carries its token now, while the server lives on."""
    import ray

    monkeypatch.setattr(local_ray, "current", None)
    left: list[str] = []
    monkeypatch.setattr(ray, "shutdown", lambda: left.append("shutdown"))
    with local_ray.reaped():  # a stand-in raylet and worker: they carry the token
        raylet = subprocess.Popen(["sleep", "60"])
        worker = subprocess.Popen(["sleep", "60"])
    started = local_ray.current
    assert started is not None
    with open(f"/proc/{raylet.pid}/stat") as f:
        start_time = int(f.read().rsplit(")", 1)[1].split()[19])
    started.raylet = (raylet.pid, start_time)  # what `reaped` finds for a real raylet
    deadline = time.monotonic() + 20
    while not _catches(started.reaper, signal.SIGUSR1) and time.monotonic() < deadline:
        time.sleep(0.02)  # the reaper is up (moments after the cluster's start)
    assert _catches(started.reaper, signal.SIGUSR1)
    try:
        assert local_ray.raylet_lost() is None
        raylet.kill()
        raylet.wait()
        assert f"raylet, pid {raylet.pid}" in (local_ray.raylet_lost() or "")
        local_ray.end_lost()
        assert left == ["shutdown"] and local_ray.current is None
        assert worker.wait(10) == -signal.SIGKILL  # ended now, not when this process exits
        assert local_ray.raylet_lost() is None  # nothing of ours to lose any more
    finally:
        worker.kill()
        worker.wait()
