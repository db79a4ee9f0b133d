"""Ends every process of one embedded Ray cluster once the process that started it dies.

Run as `python -I -S reaper.py PARENT_PID TOKEN` in a session of its own (standard library
only and no package import: it starts in milliseconds, and neither Ctrl-C nor a signal to
the server's process group reaches it). The processes of the cluster (GCS, raylet, agents,
workers) inherit `DISTSERVE_REAP_TOKEN=TOKEN` in their environment; when PARENT_PID exits,
SIGKILL included, the reaper SIGKILLs every process that carries the token and removes the
/dev/shm KV cache files named after them. Ray ties its GCS and raylet to their parent
already, but its agents outlive it by about a minute, and a restarted `serve` meets them.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

TOKEN_VAR = "DISTSERVE_REAP_TOKEN"
SHM_DIR = "/dev/shm"
KV_PREFIX = "distserve-kv-"
"""A worker's cache file is SHM_DIR/distserve-kv-<pid>-<nonce> (runtime/worker/kv_cache.py)."""


def wait_for_exit(parent: int) -> None:
    """Return once the parent process has exited (at once if it is gone already)."""
    try:
        fd = os.pidfd_open(parent)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd (old kernel, not Linux): poll
        while os.getppid() == parent:  # an orphan is handed to another parent at once
            time.sleep(0.2)
        return
    try:
        if os.getppid() == parent:  # else the pid may already be someone else's
            select.select([fd], [], [])  # a pidfd turns readable when its process exits
    finally:
        os.close(fd)


def marked(token: str) -> list[int]:
    """Live processes whose environment carries the token (a zombie's reads empty)."""
    needle = f"{TOKEN_VAR}={token}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
        except OSError:  # gone, or not ours to read
            continue
        if needle in env.split(b"\0"):
            found.append(int(name))
    return found


def reap(token: str, timeout: float = 10.0) -> set[int]:
    """SIGKILL every marked process until none is left (a dying raylet may still fork a
    worker); returns their pids."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = marked(token)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        killed.update(pids)
        time.sleep(0.05)
    return killed


def remove_caches(pids: set[int]) -> None:
    """Remove the /dev/shm KV cache files that the given workers created."""
    if not os.path.isdir(SHM_DIR):
        return
    for name in os.listdir(SHM_DIR):
        owner = name.removeprefix(KV_PREFIX).split("-", 1)[0]
        if name.startswith(KV_PREFIX) and owner.isdigit() and int(owner) in pids:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(SHM_DIR, name))


def main(argv: list[str]) -> int:
    parent, token = int(argv[0]), argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # it ends when its parent has ended
    wait_for_exit(parent)
    remove_caches(reap(token))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
