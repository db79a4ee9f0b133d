"""The embedded Ray cluster (serve without --ray-address): where it listens, and that it
ends with the process that started it.

- Listening: Ray binds its GCS, raylet, worker and agent ports to the node's address, or
  to every interface; with the node address resolved to loopback (what Ray does on macOS
  and Windows) every one of them listens on 127.0.0.1 only. Ray reads the switch once, at
  import, so it is set before Ray is first imported (or on the constant, if it was).
- Ending: Ray ties its GCS and raylet to the driver, and workers end with the raylet, but
  the agents outlive a SIGKILLed driver by a minute and more. A reaper process
  (`reaper.py`) waits for the driver and then ends every process that carries its token.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import sys
import uuid
from collections.abc import Iterator

from distserve.cluster import reaper

log = logging.getLogger(__name__)

_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""0: Ray resolves this node's address to loopback (ray._private.services.get_node_ip_address)."""


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
    children carry its token in their environment. Outside /proc (not Linux), nothing."""
    if not os.path.isdir("/proc"):
        yield
        return
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != reaper.TOKEN_VAR}
    args = [sys.executable, "-I", "-S", reaper.__file__, str(os.getpid()), token]
    try:
        # posix_spawn, not Popen: the reaper outlives this process by design, and a Popen
        # object left running warns when collected.
        os.posix_spawn(sys.executable, args, env, setsid=True)
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
