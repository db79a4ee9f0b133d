"""Bad input, overload and fuzzing against the real server: every bad request gets a 4xx
with an OpenAI-style body, overload gets 429 + Retry-After, slow and endless bodies are cut
off, and the server keeps serving."""

from __future__ import annotations

import concurrent.futures as cf
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

import httpx
import pytest

from distserve.bench.server_process import running_server

pytestmark = pytest.mark.slow  # starts a real server (Ray actors, the real model)

MODEL = "smollm2-135m"
DEADLINE = 5.0
"""The server's head and body deadlines here (--header-timeout, --body-timeout)."""
MAX_CONNECTIONS = 64
MAX_BODY = int(0.05 * 2**20)


@pytest.fixture(scope="module")
def url():
    flags = [
        "--mode",
        "colocated",
        "--instances",
        "1",
        "--max-model-len",
        "256",
        "--max-queued",
        "2",
        "--max-body-mb",
        "0.05",
        "--header-timeout",
        str(DEADLINE),
        "--body-timeout",
        str(DEADLINE),
        "--max-connections",
        str(MAX_CONNECTIONS),
    ]
    with running_server(*flags) as u:
        yield u


def _post(url: str, path: str, **kw) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(url + path, timeout=120, **kw)


def _is_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"]
    return err


@pytest.mark.parametrize(
    "body,status,code",
    [
        ({"model": MODEL, "prompt": "hi", "max_tokens": -5}, 400, None),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 10**12}, 400, "context_length_exceeded"),
        (
            {"model": MODEL, "prompt": "word " * 400, "max_tokens": 1},
            400,
            "context_length_exceeded",
        ),
        ({"model": MODEL, "prompt": ""}, 400, None),
        ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, None),
        ({"model": MODEL, "prompt": 42}, 400, None),
        ({"model": MODEL, "prompt": [10**9]}, 400, None),
        ({"model": MODEL, "prompt": ["a"] * 65}, 400, None),
        ({"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, None),
        ({"model": "gpt-4", "prompt": "hi"}, 404, "model_not_found"),
    ],
)
def test_bad_completions(url, body, status, code) -> None:
    err = _is_error(_post(url, "/v1/completions", json=body), status)
    if code:
        assert err["code"] == code


def test_bad_chat_and_bodies(url) -> None:
    _is_error(_post(url, "/v1/chat/completions", json={"model": MODEL, "messages": []}), 400)
    _is_error(
        _post(
            url,
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
        ),
        400,
    )
    headers = {"content-type": "application/json"}
    _is_error(
        _post(url, "/v1/completions", content=b'{"model": "x", "prompt": ', headers=headers), 400
    )
    _is_error(
        _post(
            url,
            "/v1/completions",
            content=b'{"model": "smollm2-135m", "prompt": "\xff\xfe bad"}',
            headers=headers,
        ),
        400,
    )
    _is_error(_post(url, "/v1/completions", json={"model": MODEL, "prompt": "x" * 100_000}), 413)
    assert httpx.get(url + "/health").status_code == 200


def test_overload_gets_429_with_retry_after(url) -> None:
    body = {
        "model": MODEL,
        "prompt": "Tell me a long story about",
        "max_tokens": 60,
        "ignore_eos": True,
    }
    with cf.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda _: _post(url, "/v1/completions", json=body), range(16)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "overloaded"
            assert 1 <= int(r.headers["retry-after"]) <= 600  # from the queue's drain rate
    assert (
        _post(
            url, "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}
        ).status_code
        == 200
    )


def test_openapi_schema_fuzzed_without_server_errors(url) -> None:
    schema = httpx.get(url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        url + "/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "25",
        "--phases",
        "examples,coverage,fuzzing",
        "--request-timeout",
        "120",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert httpx.get(url + "/health").status_code == 200


# ---- bodies that never end or never stop ---------------------------------------------------
_HEAD = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    s = socket.create_connection((parts.hostname, parts.port))
    s.settimeout(60)  # far beyond the deadlines: a server that never answers fails the test
    return s


def _answer(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    try:
        while data := s.recv(65536):
            out += data
    except ConnectionResetError:  # it closed with our unread bytes in its buffer
        pass
    s.close()
    return out


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def _completion_ok(url: str) -> bool:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    return _post(url, "/v1/completions", json=body).status_code == 200


def test_slow_heads_and_half_open_bodies_are_cut_off_at_the_deadline(url) -> None:
    t0 = time.monotonic()
    silent = [_connect(url) for _ in range(5)]
    partial_heads = [_connect(url) for _ in range(5)]
    for s in partial_heads:
        s.sendall(_HEAD)
    half_open = [_connect(url) for _ in range(50)]
    for s in half_open:
        s.sendall(_HEAD + b"content-length: 100\r\n\r\n" + b'{"model": ')
    assert _completion_ok(url)  # served meanwhile
    answers = [_answer(s) for s in silent + partial_heads + half_open]
    assert [_status(a) for a in answers] == [408] * 60, answers[:3]
    assert time.monotonic() - t0 < 10 * DEADLINE + 30  # cut off, not left open for good
    assert b"the request body did not arrive" in answers[-1]
    assert _completion_ok(url)


def test_chunked_body_over_the_limit_is_refused_as_it_arrives(url) -> None:
    s = _connect(url)
    s.sendall(_HEAD + b"transfer-encoding: chunked\r\n\r\n")
    chunk = b"x" * 4096
    sent = 0
    try:
        while sent < 2 * MAX_BODY:  # over the limit, and the body never ends
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
    except OSError:  # refused and closed before we were done: as it should
        pass
    answer = _answer(s)
    assert _status(answer) == 413 and b"body_too_large" in answer, answer[:300]
    assert _completion_ok(url)


def test_connections_beyond_the_cap_get_503(url) -> None:
    held = []
    for _ in range(MAX_CONNECTIONS + 16):
        s = _connect(url)
        s.sendall(_HEAD + b"content-length: 100\r\n\r\n{")
        held.append(s)
    statuses = [_status(_answer(s)) for s in held]
    # a request is let in only while fewer than the cap are open (how many of these
    # depends on how many the server had accepted when it read each head); those let in
    # wait for their bodies until the deadline (408), the others are refused at once (503)
    assert set(statuses) == {408, 503} or set(statuses) == {503}, statuses
    assert statuses.count(408) < MAX_CONNECTIONS, statuses
    assert _completion_ok(url)


# ---- a batch with one bad prompt ---------------------------------------------------------
def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    lines = [ln.rsplit(" ", 1) for ln in text.splitlines() if ln and not ln.startswith("#")]
    return {name: float(v) for name, v in lines}


def _started(m: dict[str, float]) -> dict[str, float]:
    """What an admitted request changes: queues, KV blocks in use, finished counts."""
    keys = ("distserve_queue_length", "distserve_requests_total")
    used = {k: v for k, v in m.items() if k.startswith("distserve_kv_blocks") and "used" in k}
    return {k: v for k, v in m.items() if k.startswith(keys)} | used


@pytest.mark.parametrize(
    "prompts",
    [[[1, 2, 3], [10**9]], ["Tell me a long story about", "word " * 400]],
    ids=["bad token id", "too long"],
)
def test_a_batch_with_one_bad_prompt_admits_none(url, prompts) -> None:
    before = _started(_metrics(url))
    assert all(v == 0 for k, v in before.items() if not k.startswith("distserve_requests"))
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 200, "ignore_eos": True}
    _is_error(_post(url, "/v1/completions", json=body), 400)
    # an admitted prompt of 200 tokens would still be queued or running now
    assert _started(_metrics(url)) == before
