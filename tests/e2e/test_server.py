"""The real server (real Ray actors, the real SmolLM2) in every placement, driven by the
official `openai` client and by raw HTTP."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from distserve import LLM, SamplingParams
from distserve.bench.server_process import running_server

pytestmark = pytest.mark.slow  # starts a real server (Ray actors, the real model)

MODEL = "smollm2-135m"
KEY = "test-key-123"
# Disaggregated with several instances of one role (2P1D, 1P2D): 1P1D's paths and more
# (test_lifecycle.py, test_faults.py and others serve 1P1D).
PLACEMENTS = {
    "2P1D": ["--mode", "disagg", "--prefill-instances", "2"],
    # Decode caches smaller than the prefill one: block counts differ across the migration.
    # The API in 2 processes of its own (server/api_processes.py): every route below then
    # runs over the link to the controller's process.
    "1P2D": ["--mode", "disagg", "--decode-instances", "2", "--decode-kv-cache-gb", "0.05"]
    + ["--api-servers", "2", "--api-key", KEY],
    "colocated": ["--mode", "colocated", "--instances", "2"],
    "chunked": ["--mode", "colocated", "--instances", "2", "--chunked-prefill", "--api-key", KEY],
}
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module", autouse=True)
def same_kernel_paths() -> Iterator[None]:
    """One row limit for the packed bf16 kernels in the reference and in every server.
    Each process otherwise times its own choice at start (runtime/worker/kernel_choice.py),
    a busy machine can tip it, and the two paths round bf16 sums differently: the greedy
    texts then part after a few tokens (seen with other test runs on the same cores)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTSERVE_PACKED_MAX_ROWS", "64")
        yield


@pytest.fixture(scope="module")
def reference(same_kernel_paths: None) -> dict[str, str]:
    """Greedy text of each prompt from the offline engine, one request at a time (as the
    tests below send them: in bf16 a different batch may move logits by a rounding step)."""
    llm = LLM(kv_cache_gb=0.05)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return {p: llm.generate(p, params, use_tqdm=False)[0].text for p in PROMPTS}


@pytest.fixture(scope="module", params=list(PLACEMENTS))
def server(request: pytest.FixtureRequest):
    with running_server(*PLACEMENTS[request.param]) as url:
        yield request.param, url


def _key(placement: str) -> str:
    return KEY if "--api-key" in PLACEMENTS[placement] else "unused"


def _client(server) -> openai.OpenAI:
    placement, url = server
    return openai.OpenAI(base_url=url + "/v1", api_key=_key(placement), max_retries=0, timeout=120)


def _http(server) -> httpx.Client:
    placement, url = server
    return httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {_key(placement)}"}, timeout=120
    )


def test_greedy_completions_equal_offline(server, reference) -> None:
    client = _client(server)
    for prompt in PROMPTS:
        r = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert r.choices[0].text == reference[prompt], (server[0], prompt)
        assert r.usage.completion_tokens == MAX_TOKENS and r.choices[0].finish_reason == "length"


def test_streaming_equals_non_streaming_chat(server) -> None:
    client = _client(server)
    messages = [{"role": "user", "content": "Name three colors."}]
    # Both requests below hit the prefix this one caches, so both compute the same chunk
    # over the same KV (a cold prefill and a hit round bf16 differently: this prompt's top
    # two first tokens are one bf16 step apart).
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0)
    full = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=30, temperature=0
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=30,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_streaming_completion_over_raw_http(server) -> None:
    with (
        _http(server) as http,
        http.stream(
            "POST",
            "/v1/completions",
            json={
                "model": MODEL,
                "prompt": PROMPTS[0],
                "max_tokens": 8,
                "stream": True,
                "temperature": 0,
                "ignore_eos": True,
            },
        ) as r,
    ):
        assert r.status_code == 200
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    timings = chunks[-1]["choices"][0]["metrics"]
    assert (
        timings["arrived"]
        <= timings["prefill_start"]
        <= timings["prefill_end"]
        <= timings["finished"]
    )
    if server[0] in ("2P1D", "1P2D"):
        assert (
            timings["prefill_end"]
            <= timings["migration_start"]
            <= timings["migration_end"]
            <= timings["finished"]
        )


def test_concurrent_requests_all_complete(server) -> None:
    import concurrent.futures as cf

    client = _client(server)

    def one(i: int) -> int:
        r = client.completions.create(
            model=MODEL,
            prompt=f"Count to {i}:",
            max_tokens=10 + i,
            temperature=0.8,
            seed=i,
            extra_body={"ignore_eos": True},
        )
        return r.usage.completion_tokens

    with cf.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == [10 + i for i in range(8)]


def _post_json(http: httpx.Client, route: str, body: dict) -> httpx.Response:
    # json.dumps escapes a lone surrogate as a client on the wire would (httpx's own
    # encoder cannot send one at all)
    return http.post(route, content=json.dumps(body), headers={"content-type": "application/json"})


def test_bad_input_gets_openai_errors(server) -> None:
    with _http(server) as http:
        cases = [
            ({"model": "nope", "prompt": "hi"}, 404, "model_not_found"),
            ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, None),
            ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, None),
            ({"model": MODEL, "prompt": "hi", "n": 9}, 400, None),
            ({"model": MODEL, "prompt": "hi", "n": 0}, 400, None),
            ({"model": MODEL, "prompt": "hi", "n": 2, "best_of": 1}, 400, None),
            ({"model": MODEL, "prompt": "hello " * 3000}, 400, "context_length_exceeded"),
            ({"model": MODEL}, 400, None),
            ({"model": MODEL, "prompt": "a\ud800b"}, 400, None),  # a lone surrogate
            ({"model": MODEL, "prompt": "a\ud800b", "stream": True}, 400, None),
            ({"model": MODEL, "prompt": [True, False]}, 400, None),  # no token ids
            ({"model": MODEL, "prompt": "hi", "temperature": 1e-300}, 400, None),
            ({"model": MODEL, "prompt": "hi", "logit_bias": {"1": 5}}, 400, None),
            ({"model": MODEL, "prompt": "hi", "best_of": 2}, 400, None),
            ({"model": MODEL, "prompt": "hi", "suffix": "!"}, 400, None),
        ]
        chat = [
            ({"role": "user", "content": "a\ud800b"}, {}, "Unicode"),
            ({"role": "user", "content": [{"type": "text", "text": "\udfff"}]}, {}, "Unicode"),
            (
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                {},
                "image content is not supported",
            ),
            (
                {"role": "user", "content": "hi"},
                {"response_format": {"type": "xml"}},  # json_object: tests/e2e/test_structured
                "response_format",
            ),
            ({"role": "user", "content": "hi"}, {"tools": [{"type": "function"}]}, "tools"),
            *[({"role": "user", "content": "hi"}, extra, says) for extra, says in BAD_FORMATS],
        ]
        for message, extra, says in chat:
            body = {"model": MODEL, "messages": [message], **extra}
            cases.append((body, 400, None))
            r = _post_json(http, "/v1/chat/completions", body)
            assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
        for body, status, code in cases:
            route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            r = _post_json(http, route, body)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert err["message"] and err["type"]
            if code:
                assert err["code"] == code
        r = http.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400 and "error" in r.json()
        assert http.get("/health").status_code == 200  # still serving


ASK_JSON = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population": {"type": "integer", "minimum": 0, "maximum": 10**9},
    },
    "required": ["city", "country"],
    "additionalProperties": False,
}
BAD_FORMATS: list[tuple[dict, str]] = [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "objekt"}}}},
     "objekt"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {
        "type": "string", "pattern": "(["}}}}, "invalid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
     "must be a JSON object"),
    ({"response_format": {"type": "json_schema"}}, "json_schema must be an object"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
]  # fmt: skip


def _valid(value: object, schema: dict) -> bool:
    """SCHEMA's subset of JSON Schema, checked by hand."""
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return (
            isinstance(value, dict)
            and all(k in value for k in schema.get("required", []))
            and (schema.get("additionalProperties", True) or set(value) <= set(props))
            and all(_valid(v, props[k]) for k, v in value.items() if k in props)
        )
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
    if kind == "integer":
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and schema.get("minimum", value) <= value <= schema.get("maximum", value)
        )
    return True


def test_structured_output_parses_and_validates(server) -> None:
    """JSON mode and a JSON schema (response_format). Disaggregated, the prefill instance
    samples the first token and the decode instance the rest, each with its own matcher
    (runtime/structured.py): without the decode side's, the output breaks the schema."""
    client = _client(server)
    kw: dict = {"model": MODEL, "messages": ASK_JSON, "max_tokens": 60, "temperature": 0}
    mode = client.chat.completions.create(**kw, response_format={"type": "json_object"})
    assert isinstance(json.loads(mode.choices[0].message.content or ""), dict), mode
    assert mode.choices[0].finish_reason == "stop" and mode.usage.completion_tokens > 2
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}}
    out = client.chat.completions.create(**kw, response_format=fmt)
    value = json.loads(out.choices[0].message.content or "")
    assert _valid(value, SCHEMA), (server[0], value)
    assert not _valid({"city": "Paris"}, SCHEMA)  # the hand-written check can fail
    # /v1/completions takes it too (streamed here: the pieces join into the JSON)
    pieces = client.completions.create(
        model=MODEL, prompt="The capital of France as JSON:", max_tokens=40, temperature=0,
        stream=True, extra_body={"response_format": fmt},
    )  # fmt: skip
    assert _valid(json.loads("".join(c.choices[0].text for c in pieces if c.choices)), SCHEMA)


def test_models_health_metrics(server) -> None:
    placement, _ = server
    with _http(server) as http:
        assert http.get("/v1/models").json()["data"][0]["id"] == MODEL
        assert http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL  # models.retrieve
        missing = http.get("/v1/models/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        assert http.get("/health").json()["status"] == "ok"
        done = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3})
        assert done.status_code == 200  # every family has a sample now
        text = http.get("/metrics").text
    assert "distserve_ttft_seconds_count" in text and "distserve_kv_blocks" in text
    assert "_created" not in text  # no series a dashboard does not use
    charted = dashboard_series()
    families = {f.name for f in text_string_to_metric_families(text)}  # it parses
    present = {m.name for f in text_string_to_metric_families(text) for m in f.samples}
    missing = charted - present - {"distserve_role_flips_total"}  # no flips in this run
    if placement not in ("2P1D", "1P2D"):  # no migrations either
        missing -= {f"distserve_migration_{x}" for x in ("bytes_total", "seconds_bucket")}
    missing -= {"distserve_live_slo_attainment"}  # only with serve --ttft-slo/--tpot-slo
    assert not missing, f"the dashboard charts series /metrics lacks: {missing}"
    assert {"distserve_prompt_tokens", "distserve_request_phase_seconds"} <= families
    if placement in ("2P1D", "1P2D"):
        assert _metric(text, "distserve_migrations_total") > 0
        assert _metric(text, "distserve_migration_bytes_total") > 0
    if placement == "1P2D":
        blocks: dict[str, float] = {}
        for labels, v in _all_samples(text, "distserve_kv_blocks"):
            name = labels.split('instance="')[1].split('"')[0]
            blocks[name] = blocks.get(name, 0) + v
        assert blocks["decode-0"] == blocks["decode-1"] < blocks["prefill-0"]


def test_api_key_only_when_set(server) -> None:
    placement, url = server
    keyed = "--api-key" in PLACEMENTS[placement]
    with httpx.Client(base_url=url) as http:
        assert http.get("/v1/models").status_code == (401 if keyed else 200)
        wrong = http.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == (401 if keyed else 200)
        if keyed:
            assert wrong.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/health").status_code == 200


def test_aborted_streams_free_every_block(server) -> None:
    """Start many long streams, drop them after a few tokens, then every instance must
    return to zero used blocks and empty queues."""
    placement, url = server
    clients = [_http(server) for _ in range(12)]
    streams = []
    for i, http in enumerate(clients):
        cm = http.stream(
            "POST",
            "/v1/completions",
            json={
                "model": MODEL,
                "prompt": f"Story {i}: once",
                "max_tokens": 400,
                "stream": True,
                "ignore_eos": True,
            },
        )
        r = cm.__enter__()
        streams.append((cm, r.iter_lines()))
    for _, lines in streams:
        got = 0
        for line in lines:
            got += line.startswith("data: ")
            if got >= 3:
                break
    for (cm, _), http in zip(streams, clients, strict=True):
        cm.__exit__(None, None, None)
        http.close()
    with _http(server) as http:
        deadline = time.monotonic() + 60
        while True:
            text = http.get("/metrics").text
            used = _samples(text, "distserve_kv_blocks", state="used")
            queued = [v for labels, v in _all_samples(text, "distserve_queue_length")]
            if used and all(v == 0 for v in used) and all(v == 0 for v in queued):
                break
            assert time.monotonic() < deadline, (
                f"blocks still used after aborts: {used}, queues {queued}"
            )
            time.sleep(0.5)
        assert _metric(text, 'distserve_requests_total{outcome="abort"}') >= 12


FLIPS = {
    "2P1D": ("prefill-1", "decode", "prefill"),
    "1P2D": ("decode-1", "prefill", "decode"),
    "colocated": ("colocated-1", "decode", "colocated"),
}
"""An instance each placement can flip and flip back (cluster/flip.py) without stranding."""


def test_flip_through_the_api(server) -> None:
    """POST /admin/flip: an unknown instance or role gets a 400 naming it; where the
    placement allows one, a flip serves at once, shows in /health and /metrics, and the
    instance flips back. (Last in this module: the later tests see the roles restored.)"""
    placement, _ = server
    with _http(server) as client:
        r = client.post("/admin/flip", json={"instance": "prefill-9", "role": "decode"})
        assert r.status_code == 400 and "no instance 'prefill-9'" in r.json()["error"]["message"]
        r = client.post("/admin/flip", json={"instance": "decode-0", "role": "verify"})
        assert r.status_code == 400  # not a role
        if placement not in FLIPS:
            return  # (chunked: its instances are all alike; flips in tests/e2e/test_flip.py)
        name, role, back = FLIPS[placement]
        r = client.post("/admin/flip", json={"instance": name, "role": role})
        assert r.status_code == 200 and r.json()["new"] == role, r.text
        health = client.get("/health").json()["instances"]
        assert health[name]["role"] == role and not health[name]["flipping"]
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        old = "colocated" if placement == "colocated" else back
        flips = f'distserve_role_flips_total{{new="{role}",old="{old}"}}'
        assert _metric(client.get("/metrics").text, flips) == 1.0
        r = client.post("/admin/flip", json={"instance": name, "role": back})
        assert r.status_code == 200 and r.json()["new"] == back, r.text


def _all_samples(text: str, name: str) -> list[tuple[str, float]]:
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) :].rsplit(" ", 1)
            out.append((labels, float(value)))
    return out


def _samples(text: str, name: str, **labels: str) -> list[float]:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return [v for lab, v in _all_samples(text, name) if all(w in lab for w in want)]


def dashboard_series() -> set[str]:
    """The series deploy/grafana/distserve.json charts (it must parse as JSON)."""
    path = os.path.join(
        os.path.dirname(__file__), "..", "..", "deploy", "grafana", "distserve.json"
    )
    with open(path, encoding="utf-8") as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return {m for e in exprs for m in re.findall(r"distserve_[a-z_]+", e)}


def _plain(line: str) -> str:
    """A sample line without its `model_name` label (every series has one)."""
    line = re.sub(r'model_name="[^"]*",?', "", line)
    return line.replace(",}", "}").replace("{}", "")


def _metric(text: str, sample: str) -> float:
    """The value of one sample, named as Prometheus prints it (`name` or `name{labels}`),
    its `model_name` label left out."""
    for line in text.splitlines():
        key, _, value = _plain(line).rpartition(" ")
        if key == sample:
            return float(value)
    return 0.0
