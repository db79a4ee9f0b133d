"""The reaper that ends an embedded Ray cluster with its driver, on real processes (no
Ray): what carries the token dies with the parent, whatever kills the parent; nothing
else does; the KV cache files of the dead are removed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import psutil
import pytest

from distserve.cluster import reaper
from distserve.cluster.local_ray import is_loopback


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    """The pids still alive after `timeout` (a generous bound: the reaper is prompt)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if not _gone(p)]


def test_reap_kills_the_marked_and_removes_their_caches(tmp_path, monkeypatch) -> None:
    token = uuid.uuid4().hex
    marked_env = dict(os.environ, **{reaper.TOKEN_VAR: token})
    marked = [subprocess.Popen(["sleep", "60"], env=marked_env) for _ in range(2)]
    other = subprocess.Popen(["sleep", "60"], env=dict(os.environ, **{reaper.TOKEN_VAR: "x"}))
    monkeypatch.setattr(reaper, "SHM_DIR", str(tmp_path))
    ours = [tmp_path / f"{reaper.KV_PREFIX}{p.pid}-abc" for p in marked]
    theirs = tmp_path / f"{reaper.KV_PREFIX}{other.pid}-abc"
    for f in [*ours, theirs]:
        f.write_bytes(b"kv")
    try:
        assert sorted(reaper.marked(token)) == sorted(p.pid for p in marked)
        killed = reaper.reap(token)
        reaper.remove_caches(killed)
        assert killed == {p.pid for p in marked}
        assert [p.wait(10) for p in marked] == [-signal.SIGKILL] * 2
        assert other.poll() is None
        assert not any(f.exists() for f in ours) and theirs.exists()
    finally:
        other.kill()
        other.wait()


_CHILD = textwrap.dedent(
    """
    import subprocess, sys, time
    from distserve.cluster import local_ray
    with local_ray.reaped():
        inside = subprocess.Popen(["sleep", "60"])
    after = subprocess.Popen(["sleep", "60"])
    print(inside.pid, after.pid, flush=True)
    time.sleep(60)
    """
)


def test_processes_started_inside_reaped_die_with_a_sigkilled_parent() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    inside, after = (int(x) for x in parent.stdout.readline().split())
    try:
        assert not _gone(inside) and not _gone(after)
        parent.kill()
        parent.wait()
        assert _wait_gone([inside]) == []
        assert not _gone(after)  # started after the block: not the reaper's
    finally:
        for pid in (inside, after):
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_is_loopback() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2", "example.com"):
        assert not is_loopback(host), host


_UNMARKED_GRANDCHILD = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from distserve.cluster import local_ray, reaper
    clean = {k: v for k, v in os.environ.items() if k != reaper.TOKEN_VAR}
    with local_ray.reaped():
        # a marked process whose child cannot be read as marked (as a Ray agent whose
        # title was written over its environment)
        code = ("import subprocess, sys, time; "
                "p = subprocess.Popen(['sleep', '60'], env=eval(sys.argv[1])); "
                "print(p.pid, flush=True); time.sleep(60)")
        marked = subprocess.Popen([sys.executable, "-c", code, repr(clean)],
                                  stdout=subprocess.PIPE, text=True)
    grandchild = int(marked.stdout.readline())
    print(marked.pid, grandchild, flush=True)
    time.sleep(60)
    """
)


@pytest.mark.serial  # the reaper's scan within a 2.5 s sleep
def test_an_unmarked_process_below_a_marked_one_dies_too() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _UNMARKED_GRANDCHILD], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child, grandchild = (int(x) for x in parent.stdout.readline().split())
    try:
        assert reaper.TOKEN_VAR not in psutil.Process(grandchild).environ()
        time.sleep(2 * reaper.SCAN_EVERY + 0.5)  # the reaper has looked at the table
        parent.kill()
        parent.wait()
        assert _wait_gone([child, grandchild]) == []
    finally:
        for pid in (child, grandchild):
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
