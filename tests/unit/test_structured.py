"""Structured output without a model: SmolLM2's token bytes, the masks the step loop puts
into a plan (and re-derives on another instance), the sampler applying them, and the
API's response_format."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from distserve.core import Request, SamplingParams, ScheduledChunk, StepPlan
from distserve.model.metadata import load_tokenizer
from distserve.model.registry import resolve
from distserve.model.tokenizer import Tokenizer
from distserve.runtime.structured import JSON_OBJECT, Constraints, check_schema
from distserve.runtime.worker.sampler import Sampler, apply_allowed
from distserve.server.protocol import ChatCompletionRequest, CompletionRequest

SCHEMA = check_schema(
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "size": {"type": "integer"}},
        "required": ["city", "size"],
        "additionalProperties": False,
    }
)


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return load_tokenizer(resolve("smollm2-135m"))[1]


def _allowed(mask: bytes | None) -> set[int]:
    assert mask is not None
    return {i for i in range(len(mask) * 8) if mask[i // 8] >> (i % 8) & 1}


def _request(tok: Tokenizer, text: str, schema: str = SCHEMA) -> Request:
    req = Request("r", [1, 2, 3], SamplingParams(json_schema=schema), 0.0, tok.eos_token_id)
    req.output_token_ids = tok.encode(text, add_special_tokens=False)
    return req


def _plan(req: Request) -> StepPlan:
    chunk = ScheduledChunk(
        req.request_id, (1,), req.num_tokens - 1, (), req.sampling_params, req.num_output_tokens
    )
    return StepPlan(1, (chunk,))


def test_token_bytes_spell_every_token(smollm2: Tokenizer) -> None:
    tokens, special = smollm2.token_bytes()
    assert len(tokens) == smollm2.vocab_size == 49152
    assert smollm2.eos_token_id in special and tokens[smollm2.eos_token_id] == b"<|im_end|>"
    text = '{"naïve": "ünïcode", "n": [1, 22]}\n\t'
    ids = smollm2.encode(text, add_special_tokens=False)
    assert b"".join(tokens[i] for i in ids) == text.encode()
    stand_in, extra = Tokenizer.bytes_only(260).token_bytes()
    assert stand_in[65] == b"A" and extra == [256, 257, 258, 259]


def test_masks_follow_the_schema_and_rederive_on_another_instance(smollm2: Tokenizer) -> None:
    start = Constraints(smollm2).mask(_request(smollm2, ""), SCHEMA, 0)
    assert all(smollm2.token_bytes()[0][t].lstrip()[:1] in (b"{", b"") for t in _allowed(start))
    req = _request(smollm2, '{"city": "Paris", "size": 12')
    here = Constraints(smollm2)
    masks = [here.mask(req, SCHEMA, k) for k in range(req.num_output_tokens + 1)]
    # a fresh matcher (a decode instance after migration) catches up in one go
    there = Constraints(smollm2).mask(req, SCHEMA, req.num_output_tokens)
    assert there == masks[-1]
    after_12 = _allowed(there)
    comma = smollm2.encode(",", add_special_tokens=False)[0]
    close = smollm2.encode("}", add_special_tokens=False)[0]
    assert close in after_12 and comma not in after_12  # no third property exists
    assert smollm2.eos_token_id not in after_12  # the object is not closed yet
    req.output_token_ids.append(close)
    assert _allowed(here.mask(req, SCHEMA, req.num_output_tokens)) == {smollm2.eos_token_id}
    # fewer outputs than it consumed (a request recomputed elsewhere): derived again
    assert here.mask(req, SCHEMA, 1) == masks[1]


def test_apply_puts_masks_into_sampling_chunks_and_forgets_departed_requests(
    smollm2: Tokenizer,
) -> None:
    cons = Constraints(smollm2)
    req = _request(smollm2, '{"city"')
    plan = cons.apply(_plan(req), {"r": req})
    assert _allowed(plan.chunks[0].allowed_tokens) == _allowed(cons.mask(req, SCHEMA, 3))
    free = Request("f", [1], SamplingParams(), 0.0)
    plain = _plan(free)
    assert cons.apply(plain, {"f": free}) is plain and len(cons) == 0  # "r" left: forgotten


def test_output_that_left_the_grammar_is_sampled_unconstrained(smollm2: Tokenizer) -> None:
    req = _request(smollm2, "hello")  # e.g. an emulated worker, which applies no mask
    assert Constraints(smollm2).mask(req, SCHEMA, req.num_output_tokens) is None


def test_sampler_picks_only_allowed_tokens() -> None:
    logits = torch.randn(3, 20)
    mask = bytes([0b0000_0100, 0b1000_0000])  # tokens 2 and 15; 16.. are past its end
    out = apply_allowed(logits, [mask, None, b"\xff\xff\xff"])
    assert torch.isinf(out[0]).sum() == 18 and out[0, 2] == logits[0, 2]
    assert torch.equal(out[1:], logits[1:])
    greedy, sampled = SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=5)
    for params in (greedy, sampled):
        tokens, lps = Sampler()(logits, [params] * 3, [0] * 3, [mask, mask, None])
        assert tokens[0] in (2, 15) and tokens[1] in (2, 15)
    params = SamplingParams(temperature=0, logprobs=0)
    _, lps = Sampler()(logits, [params], [0], [mask])
    assert lps[0] is not None  # of the raw distribution, as without a mask
    assert lps[0].logprob == pytest.approx(float(logits[0].log_softmax(-1)[lps[0].token_id]))


def _chat(**kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **kw)


def test_response_format_becomes_a_json_schema() -> None:
    assert _chat().sampling_params(16).json_schema is None
    assert _chat(response_format={"type": "text"}).sampling_params(16).json_schema is None
    assert _chat(response_format={"type": "json_object"}).sampling_params(16).json_schema == (
        JSON_OBJECT
    )
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    got = CompletionRequest(model="m", prompt="p", response_format=fmt).sampling_params(16)
    assert json.loads(got.json_schema or "") == schema


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"response_format": {"type": "xml"}}, "type must be"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}},
         "invalid JSON schema"),
        ({"response_format": {"type": "json_schema", "json_schema": "s"}}, "json_schema must"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"suffix": "!"}, "suffix"),
    ],
)  # fmt: skip
def test_bad_or_unsupported_parameters_are_refused(body: dict, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        _chat(**body)


def test_ignore_eos_cannot_run_past_the_json() -> None:
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(json_schema=JSON_OBJECT, ignore_eos=True)
