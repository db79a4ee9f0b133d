"""Start `distserve serve` as a real process on a free localhost port, and stop it (for
tests and benchmark scripts)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def running_server(*args: str, timeout: float = 240.0, kv_cache_gb: float = 0.1) -> Iterator[str]:
    """Yield the base URL (http://127.0.0.1:PORT) of a started server; SIGINT at exit."""
    serve = ["-m", "distserve.cli", "serve", "--port", "0", "--kv-cache-gb", str(kv_cache_gb)]
    cmd = [sys.executable, *serve, *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr or []), daemon=True).start()
    url = None
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("distserve ready: "):
            url = line.split()[2].removesuffix("/v1")
            break
    if url is None:
        proc.kill()
        raise RuntimeError(f"server did not start: {''.join(err)[-3000:]}")
    threading.Thread(target=lambda: proc.stdout and proc.stdout.read(), daemon=True).start()
    try:
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
