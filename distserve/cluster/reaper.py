"""Ends every process of one embedded Ray cluster once the process that started it dies.

Run as `python -I -S reaper.py PARENT_PID TOKEN` in a session of its own (standard library
only and no package import: it starts in milliseconds, and neither Ctrl-C nor a signal to
the server's process group reaches it). The processes of the cluster (GCS, raylet, agents,
workers) inherit `DISTSERVE_REAP_TOKEN=TOKEN` in their environment; when PARENT_PID exits,
SIGKILL included, the reaper SIGKILLs every process that carries the token and every
process it saw started below one of them, and removes the /dev/shm KV cache files named
after them and the server's KV store file. Ray ties its GCS and raylet to their parent
already, but its agents outlive it by about a minute, and a restarted `serve` meets them.

Why the process tree as well as the token: a process's environment as /proc shows it is
the memory its environment started in, and a process that rewrites its title in place
(Ray's agents and workers do: `ray::DashboardAgent`) may write over it; CI once met a
dashboard agent whose token could no longer be read and that outlived the server. So while
the parent lives the reaper looks at the process table once a second and remembers every
process below a marked one, by pid and start time (a pid reused after its process ended
is not the same process).

SIGUSR1 ends the cluster at once, while the parent lives: the server sends it when the
cluster is lost (its raylet killed) and it starts a fresh one (cluster/local_ray.py).
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
"""A worker's cache file is SHM_DIR/distserve-kv-<pid>-<nonce> (runtime/worker/kv_cache.py),
the server's KV store distserve-kv-<pid>-store-<nonce> (runtime/kv_store.py)."""


SCAN_EVERY = 1.0
"""Seconds between looks at the process table while the parent lives."""


def wait_for_exit(parent: int, token: str, seen: dict[int, int]) -> None:
    """Return once the parent process has exited (at once if it is gone already); until
    then, add the processes below the marked ones to `seen` (pid -> start time) every
    SCAN_EVERY seconds."""
    try:
        fd = os.pidfd_open(parent)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd (old kernel, not Linux): poll
        while os.getppid() == parent:  # an orphan is handed to another parent at once
            seen.update(below_marked(token))
            time.sleep(SCAN_EVERY)
        return
    try:
        while os.getppid() == parent:  # else the pid may already be someone else's
            seen.update(below_marked(token))
            if select.select([fd], [], [], SCAN_EVERY)[0]:  # readable: its process exited
                return
    finally:
        os.close(fd)


def _stat(pid: str) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, None if it is gone (or
    a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the name may hold spaces
    except (OSError, IndexError):
        return None
    return None if fields[0] == b"Z" else (int(fields[1]), int(fields[19]))


def below_marked(token: str) -> dict[int, int]:
    """pid -> start time of every live process below a marked one (not the marked)."""
    table = {int(n): st for n in os.listdir("/proc") if n.isdigit() and (st := _stat(n))}
    roots = set(marked(token))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, int] = {}
    todo = [c for r in roots for c in children.get(r, [])]
    while todo:
        pid = todo.pop()
        if pid in found or pid in roots or pid == os.getpid():
            continue
        found[pid] = table[pid][1]
        todo.extend(children.get(pid, []))
    return found


def still_seen(seen: dict[int, int]) -> list[int]:
    """The processes in `seen` that are alive and the same process (same start time)."""
    return [pid for pid, start in seen.items() if (st := _stat(str(pid))) and st[1] == start]


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


def reap(token: str, seen: dict[int, int] | None = None, timeout: float = 10.0) -> set[int]:
    """SIGKILL every marked process, and those of `seen` still alive, until none is left
    (a dying raylet may still fork a worker); returns their pids."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = marked(token) + still_seen(seen or {})
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


class ReapNow(Exception):
    """SIGUSR1: the parent asks for its cluster's end now (it has lost it)."""


def _reap_now(signum: int, frame: object) -> None:
    raise ReapNow


def main(argv: list[str]) -> int:
    parent, token = int(argv[0]), argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # it ends when its parent has ended
    seen: dict[int, int] = {}
    signal.signal(signal.SIGUSR1, _reap_now)
    parent_gone = True
    try:
        wait_for_exit(parent, token, seen)
    except ReapNow:
        parent_gone = False
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # once is enough
    # the server's own KV store file (runtime/kv_store.py) goes with the server only: it
    # outlives a lost cluster
    remove_caches(reap(token, seen) | ({parent} if parent_gone else set()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
