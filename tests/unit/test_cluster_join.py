"""Joining a Ray cluster with --ray-address: a dead address or one that wants a token is a
clear error naming the flag and what to do, not a hang or a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from distserve.cluster.placement import join_error_message, probe


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_an_address_where_nothing_listens_fails_at_once() -> None:
    with pytest.raises(ConnectionError, match="nothing accepts connections"):
        probe(f"127.0.0.1:{_closed_port()}", timeout=2.0)
    probe("auto")  # left to Ray


def test_an_authentication_failure_says_to_export_the_token_mode() -> None:
    msg = join_error_message("10.0.0.1:6379", RuntimeError("Unauthenticated: token required"))
    assert msg.startswith("--ray-address 10.0.0.1:6379: could not join")
    assert "RAY_AUTH_MODE=token" in msg and "docs/multi-node.md" in msg
    other = join_error_message("10.0.0.1:6379", TimeoutError("timed out"))
    assert "RAY_AUTH_MODE" not in other and "ray start --head" in other


@pytest.mark.slow  # the CLI process
def test_serve_with_a_dead_ray_address_exits_with_the_message() -> None:
    addr = f"127.0.0.1:{_closed_port()}"
    cmd = [sys.executable, "-m", "distserve.cli", "serve", "--ray-address", addr]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert f"--ray-address {addr}: could not join the Ray cluster" in r.stderr
    assert "Traceback" not in r.stderr
