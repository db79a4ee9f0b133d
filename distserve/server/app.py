"""The OpenAI-compatible routes over a Frontend: a Controller in this process, or one in
another process reached over a link (server/frontend.py, server/remote.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from distserve.cluster.controller import Overloaded, RequestFailed
from distserve.core import SamplingParams
from distserve.runtime.outputs import RequestOutput
from distserve.server import responses as R
from distserve.server.auth import ApiKeyCheck
from distserve.server.errors import APIError, install_handlers
from distserve.server.frontend import Frontend
from distserve.server.limits import BodyLimits
from distserve.server.prompts import PromptEncoder
from distserve.server.protocol import ChatCompletionRequest, CompletionRequest, FlipRequest

Prompt = str | list[int]
MAX_PROMPTS = 64
"""Prompts one completions request may carry."""


def build_app(
    frontend: Frontend,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 8 << 20,
    body_timeout: float = 30.0,
) -> FastAPI:
    """Routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.
    A body over `max_body_bytes`, or not whole within `body_timeout` s, is refused."""
    app = FastAPI(title="distserve", version="0.1.0")
    install_handlers(app)
    tokenizer = frontend.tokenizer
    max_model_len = frontend.max_model_len
    encoder = PromptEncoder(tokenizer, max_model_len)

    if api_key:
        app.add_middleware(ApiKeyCheck, api_key=api_key)
    # added last, so outermost: bodies are limited before anything reads them
    app.add_middleware(BodyLimits, max_bytes=max_body_bytes, timeout=body_timeout)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(
                404,
                f"model {name!r} does not exist; this server serves {model_name!r}",
                "model",
                "model_not_found",
            )

    async def submit(prompts: list[tuple[Prompt, SamplingParams]], n: int) -> list[Any]:
        """Admit every prompt, `n` choices each (prompt by prompt, choice by choice), or,
        if one is refused, none."""
        ids = [uuid.uuid4().hex[:16] for _ in range(len(prompts) * n)]
        try:
            return await frontend.submit(prompts, ids, n)
        except ValueError as e:
            code = (
                "context_length_exceeded"
                if "max_model_len" in str(e) or "KV blocks" in str(e)
                else "invalid_value"
            )
            raise APIError(400, str(e), "prompt", code) from None
        except Overloaded as e:
            retry = {"Retry-After": str(e.retry_after)}
            raise APIError(429, str(e), code="overloaded", headers=retry) from None
        except RequestFailed as e:
            raise APIError(503, str(e), headers={"Retry-After": "5"}) from None

    def params_of(
        body: CompletionRequest | ChatCompletionRequest, prompt_len: int
    ) -> SamplingParams:
        room = max_model_len - prompt_len
        if room < 1:
            raise APIError(
                400,
                f"the prompt has {prompt_len} tokens; this model's context is {max_model_len}",
                "prompt",
                "context_length_exceeded",
            )
        try:
            params = body.sampling_params(room)
        except ValueError as e:
            raise APIError(400, str(e), str(e).split(" ", 1)[0], "invalid_value") from None
        if params.max_tokens > room:
            raise APIError(
                400,
                f"max_tokens {params.max_tokens} + the prompt's {prompt_len} tokens exceed "
                f"this model's context of {max_model_len}",
                "max_tokens",
                "context_length_exceeded",
            )
        return params

    async def run_to_end(request: Request, states: list[Any]) -> list[RequestOutput]:
        """Collect final outputs; abort every request if the client goes away first."""

        async def last(state: Any) -> RequestOutput:
            out = None
            async for item in frontend.stream(state):
                out = item
            if out is None:
                raise RequestFailed("the request was aborted")
            return out

        work = asyncio.ensure_future(asyncio.gather(*(last(s) for s in states)))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                raise APIError(499, "client disconnected")
            return work.result()
        except RequestFailed as e:
            raise APIError(503, str(e)) from None
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
            for s in states:
                frontend.abort(s.request_id)  # no-op for finished ones

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            body, code = await frontend.health()
        except RequestFailed as e:
            raise APIError(503, str(e)) from None
        return JSONResponse(body, status_code=code)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        try:
            text = await frontend.metrics_text()
        except RequestFailed as e:
            raise APIError(503, str(e)) from None
        return Response(text, media_type="text/plain; version=0.0.4")

    @app.post("/admin/flip")
    async def flip(body: FlipRequest) -> dict[str, Any]:
        """Turn an instance to another role without reloading it; returns once it admits
        work again (its running requests finish first)."""
        try:
            return await frontend.flip(body.instance, body.role)
        except ValueError as e:
            raise APIError(400, str(e), "instance") from None
        except RequestFailed as e:
            raise APIError(503, str(e)) from None

    card = {
        "id": model_name,
        "object": "model",
        "created": 0,
        "owned_by": "distserve",
        "max_model_len": max_model_len,
    }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return card

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        prompts = body.prompts()
        if len(prompts) > MAX_PROMPTS:
            raise APIError(
                400, f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", "prompt"
            )
        encoded = [await encoder.encode(p) if isinstance(p, str) else p for p in prompts]
        states = await submit([(ids, params_of(body, len(ids))) for ids in encoded], body.n)
        env = R.Envelope("cmpl", states[0].request_id, model_name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _stream(
                frontend,
                states,
                lambda i, o: _completion_chunk(env, i, o, tokenizer),
                env,
                "text_completion",
                include_usage,
                body.n,
            )
        outs = await run_to_end(request, states)
        choices = [
            {
                "index": i,
                "text": o.text,
                "logprobs": R.completion_logprobs(o, tokenizer, False),
                "finish_reason": o.finish_reason,
                "metrics": R.timings(o),
            }
            for i, o in enumerate(outs)
        ]
        usage = _usage(list(enumerate(outs)), body.n)
        return env.body("text_completion", choices=choices, usage=usage)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        check_model(body.model)
        try:
            prompt = tokenizer.apply_chat_template(body.conversation())
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        ids = await encoder.encode(prompt, "messages")
        states = await submit([(ids, params_of(body, len(ids)))], body.n)
        env = R.Envelope("chatcmpl", states[0].request_id, model_name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _stream(
                frontend,
                states,
                lambda i, o: _chat_chunk(env, i, o, tokenizer),
                env,
                "chat.completion.chunk",
                include_usage,
                body.n,
                chat=True,
            )
        outs = await run_to_end(request, states)
        choices = [
            {
                "index": i, "message": {"role": "assistant", "content": out.text},
                "logprobs": R.chat_logprobs(out, tokenizer, False),
                "finish_reason": out.finish_reason, "metrics": R.timings(out),
            }
            for i, out in enumerate(outs)
        ]  # fmt: skip
        usage = _usage(list(enumerate(outs)), body.n)
        return env.body("chat.completion", choices=choices, usage=usage)

    return app


def _usage(outs: list[tuple[int, RequestOutput]], n: int) -> dict[str, Any]:
    """Usage of finished choices (choice index, output): each prompt counted once (its
    first choice's count of cached tokens), the completions of every choice summed."""
    first: dict[int, RequestOutput] = {}
    for i, o in sorted(outs, key=lambda io: io[0]):
        first.setdefault(i // n, o)
    return R.usage(
        sum(len(o.prompt_token_ids) for o in first.values()),
        sum(len(o.token_ids) for _, o in outs),
        sum(o.num_cached_tokens for o in first.values()),
    )


def _completion_chunk(
    env: R.Envelope, index: int, out: RequestOutput, tokenizer: Any
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": index,
        "text": out.new_text,
        "logprobs": R.completion_logprobs(out, tokenizer, True),
        "finish_reason": out.finish_reason if out.finished else None,
    }
    if out.finished:
        choice["metrics"] = R.timings(out)
    return env.body("text_completion", choices=[choice])


def _chat_chunk(env: R.Envelope, index: int, out: RequestOutput, tokenizer: Any) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": index,
        "delta": {"content": out.new_text},
        "logprobs": R.chat_logprobs(out, tokenizer, True),
        "finish_reason": out.finish_reason if out.finished else None,
    }
    if out.finished:
        choice["metrics"] = R.timings(out)
    return env.body("chat.completion.chunk", choices=[choice])


def _stream(
    frontend: Frontend,
    states: list[Any],
    chunk: Callable[[int, RequestOutput], dict[str, Any]],
    env: R.Envelope,
    obj: str,
    include_usage: bool,
    n: int = 1,
    chat: bool = False,
) -> StreamingResponse:
    """SSE of every request's deltas (interleaved as they come; request i is choice i,
    `n` choices a prompt), then usage and [DONE]. A client that disconnects cancels the
    generator: every request is aborted."""

    async def events() -> AsyncIterator[str]:
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(i: int, state: Any) -> None:
            try:
                async for out in frontend.stream(state):
                    queue.put_nowait((i, out))
                queue.put_nowait((i, None))
            except RequestFailed as e:
                queue.put_nowait((i, e))

        pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(states)]
        finals: list[tuple[int, RequestOutput]] = []
        try:
            for i in range(len(states) if chat else 0):
                role = {"role": "assistant", "content": ""}
                first = {"index": i, "delta": role, "logprobs": None, "finish_reason": None}
                yield R.sse(env.body(obj, choices=[first]))
            open_streams = len(states)
            while open_streams:
                i, item = await queue.get()
                if item is None:
                    open_streams -= 1
                elif isinstance(item, BaseException):
                    yield R.sse(
                        {
                            "error": {
                                "message": str(item),
                                "type": "server_error",
                                "param": None,
                                "code": None,
                            }
                        }
                    )
                    open_streams -= 1
                else:
                    if item.finished:
                        finals.append((i, item))
                    yield R.sse(chunk(i, item))
            if include_usage:
                yield R.sse(env.body(obj, choices=[], usage=_usage(finals, n)))
            yield R.sse("[DONE]")
        finally:
            for p in pumps:
                p.cancel()
            for s in states:
                frontend.abort(s.request_id)  # no-op for finished ones

    return StreamingResponse(events(), media_type="text/event-stream")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
