"""The embedded Ray cluster (serve without --ray-address): where it listens, and that it
ends with the process that started it.

- Listening: Ray binds its GCS, raylet, worker and agent ports to the node's address, or
  to every interface; with the node address resolved to loopback (what Ray does on macOS
  and Windows) every one of them listens on 127.0.0.1 only. Ray reads the switch once, at
  import, so it is set before Ray is first imported (or on the constant, if it was).
- Ending: Ray ties its GCS and raylet to the driver, and workers end with the raylet, but
  the agents outlive a SIGKILLed driver by a minute and more. A reaper process
  (`reaper.py`) waits for the driver and then ends every process that carries its token.
- Losing it: with its raylet gone (SIGKILL, the OOM killer) the cluster cannot start a
  worker again, and Ray declares this driver's node dead some 15 s later, every actor with
  it. `RayLink` tells recovery (cluster/recovery.py) at once, ends what is left of the old
  cluster (its reaper, told by SIGUSR1) and starts a fresh one with the same settings; a
  cluster joined with --ray-address is joined again, with backoff, until it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator

from distserve.cluster import reaper

log = logging.getLogger(__name__)

_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""0: Ray resolves this node's address to loopback (ray._private.services.get_node_ip_address)."""


@dataclasses.dataclass
class Started:
    """The local cluster this process started last: its reaper and its raylet."""

    token: str
    reaper: int
    """pid of its reaper (a child of this process)."""
    raylet: tuple[int, int] | None = None
    """(pid, start time) of its raylet, once started; None if none was found."""


current: Started | None = None
"""The local cluster of this process (set by `reaped` once Ray has started in it)."""


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (localhost, 127.0.0.0/8, ::1, and
    ::ffff:127.x, loopback as IPv6 sockets show it)."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def prepare(loopback: bool) -> None:
    """Environment for a local cluster, before Ray's first import in this process: token
    authentication, and with `loopback`, every Ray port on 127.0.0.1."""
    # Token authentication on, said explicitly: Ray enables it for a new local cluster
    # anyway, but warns at every start when the mode is left unset. Only before Ray's
    # import: set after it, the driver reads "disabled" and its own GCS refuses it.
    if "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    if not loopback:
        return
    os.environ[_CLUSTER_SWITCH] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # imported already (tests): Ray reads it at each use
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]


@contextlib.contextmanager
def reaped() -> Iterator[None]:
    """Processes started inside the block (and theirs) are SIGKILLed when this process
    exits, however it exits: a reaper in its own session waits for this process, and the
    children carry its token in their environment. Outside /proc (not Linux), nothing.
    Once the block has run, `current` names its reaper and the raylet started in it."""
    if not os.path.isdir("/proc"):
        yield
        return
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != reaper.TOKEN_VAR}
    args = [sys.executable, "-I", "-S", reaper.__file__, str(os.getpid()), token]
    try:
        # posix_spawn, not Popen: the reaper outlives this process by design, and a Popen
        # object left running warns when collected.
        pid = os.posix_spawn(sys.executable, args, env, setsid=True)
    except (OSError, NotImplementedError) as e:
        log.warning("no reaper (%s): Ray's processes may outlive a killed server", e)
        yield
        return
    os.environ[reaper.TOKEN_VAR] = token
    try:
        yield
    finally:
        # only the cluster's processes carry it, not what this process starts later
        os.environ.pop(reaper.TOKEN_VAR, None)
    global current
    current = Started(token, pid, _raylet(token))


def _raylet(token: str) -> tuple[int, int] | None:
    """(pid, start time) of the raylet among the processes that carry `token`."""
    for pid in reaper.marked(token):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0")[0]
        except OSError:
            continue
        st = reaper._stat(str(pid))
        if os.path.basename(argv0) == b"raylet" and st is not None:
            return pid, st[1]
    return None


def raylet_lost() -> str | None:
    """Why the local cluster this process started is gone (its raylet has ended), or
    None while it runs (or when this process started none)."""
    started = current
    if started is None or started.raylet is None:
        return None
    pid, start = started.raylet
    st = reaper._stat(str(pid))  # None: ended (a zombie until Ray collects it) or gone
    if st is not None and st[1] == start:
        return None
    return f"the local Ray cluster is gone (its raylet, pid {pid}, has ended)"


def end_lost(timeout: float = 10.0) -> None:
    """Leave a local cluster that has lost its raylet and end what is left of it (GCS,
    agents, workers still holding a model) now rather than when this process exits; a
    fresh cluster may be started after. Blocks up to `timeout` s for the old reaper."""
    global current
    started, current = current, None
    import ray

    with no_auto_connect():
        ray.shutdown()
    if started is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(started.reaper, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # collect it: it is this process's child
        try:
            pid, status = os.waitpid(started.reaper, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.05)
            continue
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGUSR1:
            # it had not yet set up its handler (moments after its start): reap here
            reaper.remove_caches(reaper.reap(started.token))
        return
    log.warning("the reaper of the lost cluster (pid %d) has not finished", started.reaper)


@contextlib.contextmanager
def no_auto_connect() -> Iterator[None]:
    """Inside, a Ray call on a handle of the old cluster raises instead of starting a
    default cluster of its own (Ray starts one on any call while none is connected)."""
    try:
        from ray._private import auto_init_hook
    except ImportError:  # another layout: Ray's default stands
        yield
        return
    before = auto_init_hook.enable_auto_connect
    auto_init_hook.enable_auto_connect = False
    try:
        yield
    finally:
        auto_init_hook.enable_auto_connect = before


class RayLink:
    """This process's link to its Ray cluster, as recovery (cluster/recovery.py) sees it:
    whether the cluster is gone, and a new link in place of a lost one. `reinit` starts a
    fresh local cluster or joins `address` again, as at start (placement.reinit_ray)."""

    def __init__(
        self,
        address: str | None,
        reinit: Callable[[], None],
        probe_every: float = 5.0,
        probe_timeout: float = 3.0,
    ) -> None:
        self.address = address
        """None: the embedded cluster this process starts; else the one it joins."""
        self.reinit = reinit
        self.probe_every, self.probe_timeout = probe_every, probe_timeout
        self.lost: str | None = None
        """Why the cluster is gone, from when that is seen until a new link runs."""
        self.losses = 0
        self.reconnects = 0
        self._lock: asyncio.Lock | None = None
        self._next_probe = 0.0
        self._misses = 0

    @property
    def closes_lost_workers(self) -> bool:
        """Whether the workers of a lost cluster may still be closed: the embedded
        cluster's GCS outlives its raylet, while a Ray call to the gone head of a joined
        cluster blocks for a minute and then aborts this process."""
        return self.address is None

    async def gone(self, now: bool = False) -> str | None:
        """Why the cluster is gone, or None. The embedded one: at once, from its raylet's
        process; a joined one: from its head, asked every `probe_every` s (no answer in
        `probe_timeout` s twice running: gone), or with `now` (a worker has failed
        already) at once, and one miss is enough."""
        if self.lost is None:
            why = raylet_lost() if self.address is None else await self._probe(now)
            if why is not None:
                self.lost, self.losses = why, self.losses + 1
                log.error("%s; every instance fails and is restarted on a new cluster", why)
        return self.lost

    async def _probe(self, now: bool) -> str | None:
        """A joined cluster is gone once its head (the GCS at `address`) has not answered
        twice running. Not through Ray: a Ray call left waiting on a gone GCS aborts this
        process when a new GCS answers at that address."""
        t = time.monotonic()
        if self.address is None or (t < self._next_probe and not now):
            return None
        self._next_probe = t + self.probe_every
        try:
            await asyncio.to_thread(check_reachable, self.address, self.probe_timeout)
        except ConnectionError as e:
            self._misses += 1
            if self._misses >= 2 or now:
                return f"{e}: the cluster is gone"
            return None
        self._misses = 0
        return None

    async def reconnect(self) -> None:
        """Once the cluster is gone: a fresh local cluster (the embedded one, after ending
        what is left of the old) or the same cluster joined again. Concurrent callers share
        one try; nothing happens while the cluster runs; raises if it cannot."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.lost is None:
                return
            if self.address is None:
                log.warning("starting a fresh local Ray cluster")
            else:
                log.warning("reconnecting to the Ray cluster at %s", self.address)
            t0 = time.monotonic()
            with no_auto_connect():  # a stale handle's call must not start a cluster
                await asyncio.to_thread(self._swap)
            self.lost, self._misses = None, 0
            self.reconnects += 1
            log.warning("Ray cluster up again in %.1f s", time.monotonic() - t0)

    def _swap(self) -> None:
        if self.address is None:
            end_lost()
        else:
            import ray

            ray.shutdown()
            # Ray's own client, once connected, ends this process when the GCS stays away
            # for a minute: join only a cluster that answers
            check_reachable(self.address)
        # started from a thread, Ray warns that it leaves SIGTERM alone: serve handles it
        ray_log = logging.getLogger("ray._private.worker")
        quiet = _Without("SIGTERM handler is not set")
        ray_log.addFilter(quiet)
        try:
            self.reinit()
        finally:
            ray_log.removeFilter(quiet)


class _Without(logging.Filter):
    """Drops the log records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Raise ConnectionError unless something listens at `address` (host:port; other
    forms, such as ray:// or auto, are left to Ray)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout).close()
    except OSError as e:
        raise ConnectionError(f"the Ray cluster's head at {address} does not answer: {e}") from None
