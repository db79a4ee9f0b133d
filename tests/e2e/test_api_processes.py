"""`serve --api-servers N`: the HTTP API in processes of its own, linked to the
controller's. The routes themselves are covered by test_server.py (its 1P2D placement runs
them this way); here, what the processes add: a killed API process loses its streams but
no KV block and is started again, and the API processes go when the controller does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow  # starts real servers

MODEL = "opt-13b"
EMULATED = ["--emulate", "a100", "--model", MODEL, "--mode", "disagg", "--no-ray"]


def _children(pid: int) -> list[int]:
    """Pids of the processes whose parent is `pid`."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def _api_pids(pid: int) -> list[int]:
    pids = []
    for child in _children(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"distserve.server.api_processes" in cmd:
            pids.append(child)
    return sorted(pids)


def _start(*flags: str) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "distserve.cli", "serve", "--port", "0", *EMULATED, *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr or []), daemon=True).start()
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("distserve ready: "):
            threading.Thread(target=lambda: proc.stdout and proc.stdout.read(), daemon=True).start()
            return proc, line.split()[2].removesuffix("/v1")
        if not line:
            break
    proc.kill()
    raise AssertionError(f"the server did not start: {''.join(err)[-3000:]}")


def _used_blocks(http: httpx.Client) -> list[float]:
    used = []
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("distserve_kv_blocks{") and 'state="used"' in line:
            used.append(float(line.rsplit(" ", 1)[1]))
    return used


def _aborts(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("distserve_requests_total{") and 'outcome="abort"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _long_stream(url: str, got: threading.Event, errors: list[BaseException]) -> None:
    body = {"model": MODEL, "prompt": "tell me", "max_tokens": 1500, "stream": True}
    body["ignore_eos"] = True
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got.set()
    except httpx.HTTPError as e:
        errors.append(e)


def test_a_killed_api_process_frees_its_requests_and_is_replaced() -> None:
    proc, url = _start("--api-servers", "1")
    try:
        (api,) = _api_pids(proc.pid)
        errors: list[BaseException] = []
        events = [threading.Event() for _ in range(6)]
        threads = [
            threading.Thread(target=_long_stream, args=(url, ev, errors), daemon=True)
            for ev in events
        ]
        for t in threads:
            t.start()
        for ev in events:
            assert ev.wait(60), "a stream gave no token"
        os.kill(api, signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert len(errors) == len(threads), "a stream outlived its API process"
        deadline, used = time.monotonic() + 60, []
        while True:  # a new API process listens again, and the streams' blocks are free
            pids = _api_pids(proc.pid)
            try:
                with httpx.Client(base_url=url, timeout=30) as http:
                    used = _used_blocks(http)
                    if pids and pids != [api] and used and all(v == 0 for v in used):
                        body = {"model": MODEL, "prompt": "again", "max_tokens": 4}
                        r = http.post("/v1/completions", json=body)
                        assert r.status_code == 200, r.text
                        assert r.json()["usage"]["completion_tokens"] == 4
                        # aborted, not run to their end: 1,500 tokens take ~30 s more
                        assert _aborts(http) == len(threads)
                        break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not recovered: api {pids}, used {used}"
            time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    assert proc.returncode == 0


def test_api_processes_share_the_port_and_leave_with_the_controller() -> None:
    proc, url = _start("--api-servers", "2")
    try:
        pids = _api_pids(proc.pid)
        assert len(pids) == 2
        for paused, other in (pids, pids[::-1]):
            # with one process stopped, the other accepts every connection on the port
            os.kill(paused, signal.SIGSTOP)
            try:
                for i in range(3):
                    body = {"model": MODEL, "prompt": f"p{i}", "max_tokens": 3}
                    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
                    assert r.status_code == 200, f"with {paused} stopped: {r.text}"
            finally:
                os.kill(paused, signal.SIGCONT)
            assert _alive(other)
        bad = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "n": 0})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"
        assert httpx.get(url + "/health").json()["status"] == "ok"
    finally:
        proc.kill()  # no chance to stop them: they must notice the link close
        proc.wait(30)
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{p}") and _alive(p) for p in pids):
        assert time.monotonic() < deadline, "API processes outlived the controller"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("api_servers", ["0", "1"])
def test_a_port_in_use_is_a_clear_error(api_servers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cmd = [sys.executable, "-m", "distserve.cli", "serve", "--port", port, *EMULATED]
        done = subprocess.run(
            [*cmd, "--api-servers", api_servers], capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "distserve serve: error: --port" in done.stderr and "Traceback" not in done.stderr
