"""Bad input, overload and fuzzing against the real server: every bad request gets a 4xx
with an OpenAI-style body, overload gets 429 + Retry-After, and the server keeps serving."""

from __future__ import annotations

import concurrent.futures as cf
import subprocess
import sys

import httpx
import pytest

from distserve.bench.server_process import running_server

pytestmark = pytest.mark.slow  # starts a real server (Ray actors, the real model)

MODEL = "smollm2-135m"


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
            assert r.headers["retry-after"] and r.json()["error"]["code"] == "overloaded"
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
