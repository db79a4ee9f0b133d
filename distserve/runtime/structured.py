"""Structured output: a JSON schema constrains which tokens a request may sample
(design note 27).

The grammar library is llguidance, imported on first use. The step loop of each
instance keeps one matcher per constrained request, derived from the tokens the request
has generated so far: a request that arrives on an instance (a decode instance after
migration, a restarted instance after a fault, a flipped one) gets a fresh matcher
advanced over its output tokens, so no grammar state crosses a process or survives a
request's move. Before each step, the chunks that sample get the bitmask of the tokens
the grammar allows next (`ScheduledChunk.allowed_tokens`); the worker's sampler sets
every other token's logit to -inf.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import Any

from distserve.core import Request, StepPlan
from distserve.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

JSON_OBJECT = '{"type": "object"}'
"""The schema of JSON mode (`response_format` `json_object`): any JSON object."""


def grammar_of(schema: str) -> str:
    """llguidance's grammar for a JSON schema given as JSON text."""
    import llguidance

    return str(llguidance.LLMatcher.grammar_from_json_schema(schema))


def check_schema(schema: Any) -> str:
    """The schema as compact JSON text, if the grammar library can constrain output to
    it; ValueError saying what is wrong otherwise."""
    if not isinstance(schema, dict):
        raise ValueError("the JSON schema must be a JSON object")
    import llguidance

    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    try:
        error = llguidance.LLMatcher.validate_grammar(grammar_of(text))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a panic in the native library is a BaseException
        error = str(e) or type(e).__name__
    if error:
        raise ValueError(f"invalid JSON schema: {error.strip()}")
    return text


_VOCABS: dict[int, tuple[Tokenizer, Any]] = {}


def _vocabulary(tokenizer: Tokenizer) -> Any:
    """llguidance's view of a tokenizer's vocabulary (built once per tokenizer: ~0.1 s
    for 49k tokens)."""
    hit = _VOCABS.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    import llguidance

    tokens, special = tokenizer.token_bytes()

    class Vocabulary:
        eos_token_id = tokenizer.eos_token_id
        bos_token_id = tokenizer.bos_token_id
        special_token_ids = special

        def __init__(self) -> None:
            self.tokens = tokens

        def __call__(self, text: bytes) -> list[int]:
            return tokenizer.encode(text.decode("utf-8", "replace"), add_special_tokens=False)

    vocab = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary()))
    _VOCABS[id(tokenizer)] = (tokenizer, vocab)
    return vocab


@dataclass
class _Matcher:
    matcher: Any
    """llguidance.LLMatcher"""
    consumed: int = 0
    """Output tokens it has advanced over."""
    failed: bool = False


class Constraints:
    """The grammar matchers of one instance's constrained requests, by request id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._matchers: dict[str, _Matcher] = {}
        self.num_masks = 0
        """Masks computed (a counter)."""

    def __len__(self) -> int:
        return len(self._matchers)

    def apply(self, plan: StepPlan, requests: dict[str, Request]) -> StepPlan:
        """The plan with the allowed tokens of every chunk that samples for a request with
        a JSON schema; forgets the matchers of requests that left `requests`."""
        for rid in [r for r in self._matchers if r not in requests]:
            del self._matchers[rid]
        if not any(c.sampling_params and c.sampling_params.json_schema for c in plan.chunks):
            return plan
        chunks = []
        for c in plan.chunks:
            schema = c.sampling_params.json_schema if c.sampling_params else None
            req = requests.get(c.request_id)
            if schema is None or req is None:
                chunks.append(c)
                continue
            mask = self.mask(req, schema, c.output_index)
            chunks.append(replace(c, allowed_tokens=mask))
        return replace(plan, chunks=tuple(chunks))

    def mask(self, req: Request, schema: str, num_outputs: int) -> bytes | None:
        """The bitmask (bit i of byte i // 8: token i) of the tokens that may follow the
        request's first `num_outputs` output tokens; None once the output has left the
        grammar (possible only where the mask was not applied: an emulated worker)."""
        state = self._matchers.get(req.request_id)
        if state is None or state.consumed > num_outputs:
            import llguidance

            vocab = _vocabulary(self.tokenizer)
            state = _Matcher(llguidance.LLMatcher(vocab, grammar_of(schema), log_level=0))
            self._matchers[req.request_id] = state
            if state.matcher.is_error():  # the API checked the schema: not expected
                state.failed = True
                log.warning("request %s: %s", req.request_id, state.matcher.get_error())
        if state.failed:
            return None
        if state.consumed < num_outputs:
            new = req.output_token_ids[state.consumed : num_outputs]
            state.consumed = num_outputs
            if not state.matcher.consume_tokens(new):
                state.failed = True
                log.warning(
                    "request %s left its grammar (%s); sampling it unconstrained",
                    req.request_id,
                    state.matcher.get_error(),
                )
                return None
        self.num_masks += 1
        return bytes(state.matcher.compute_bitmask())
