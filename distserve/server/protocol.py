"""Request bodies of the OpenAI API subset we serve, validated by pydantic, and their
translation into SamplingParams."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from distserve.cluster.choices import MAX_CHOICES
from distserve.core import SamplingParams
from distserve.runtime.structured import JSON_OBJECT, check_schema


class StreamOptions(BaseModel):
    include_usage: bool = False


UNSUPPORTED = {
    "logit_bias": "logit_bias",
    "best_of": "best_of",
    "suffix": "suffix",
    "tools": "tools (function calling)",
    "tool_choice": "tool_choice (function calling)",
    "functions": "functions (function calling)",
    "function_call": "function_call (function calling)",
}
"""Parameters of the OpenAI API that this server does not implement: a request that sets
one gets a 400 naming it, never a 200 that silently ignored it."""

MIN_TEMPERATURE = 1e-5
"""Below this (and above 0) the logits' scaling overflows in the sampler's dtype and yields
end-of-text tokens; 0 is greedy."""


def _unset(name: str, value: Any) -> bool:
    """Whether an unsupported parameter is absent in effect (its default or empty)."""
    if value is None or value == {} or value == [] or value == "":
        return True
    if name == "best_of":
        return value == 1
    if name == "tool_choice":
        return value == "none"
    return False


def _check_text(v: Any) -> Any:
    """Reject strings that cannot be encoded as UTF-8 (a lone surrogate such as '\\ud800'
    decodes from JSON but breaks the tokenizer)."""
    for s in [v] if isinstance(v, str) else v if isinstance(v, list) else []:
        if isinstance(s, str):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("text is not valid Unicode (a lone surrogate?)") from None
    return v


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            n, best_of = data.get("n", 1), data.get("best_of")
            if type(n) is int and type(best_of) is int and best_of < n:
                raise ValueError(f"best_of ({best_of}) must be at least n ({n})")
            for name, what in UNSUPPORTED.items():
                if name in data and not _unset(name, data[name]):
                    raise ValueError(f"{what} is not supported by this server")
        return data

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="extension: sample among the k most likely tokens")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description=f"choices per prompt (1 to {MAX_CHOICES})")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = Field(
        False, description="extension: generate past the end-of-sequence token"
    )
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: must be 0")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: must be 0")
    user: str | None = None
    response_format: dict[str, Any] | None = Field(
        None,
        description="structured output: {'type': 'text' | 'json_object' | 'json_schema'}",
    )

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        """Checked here, schema included, so that a bad one is a 400 before any work."""
        if v is None:
            return None
        kind = v.get("type")
        if kind in ("text", "json_object"):
            return v
        if kind != "json_schema":
            raise ValueError("type must be 'text', 'json_object' or 'json_schema'")
        spec = v.get("json_schema")
        if not isinstance(spec, dict):
            raise ValueError("json_schema must be an object with the schema under 'schema'")
        return {"type": kind, "schema": check_schema(spec.get("schema", {}))}

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return _check_text(v)  # type: ignore[no-any-return]

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return v

    def _params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            seed=self.seed, stop=stop, ignore_eos=self.ignore_eos, logprobs=logprobs,
            json_schema=self._json_schema(),
        )  # fmt: skip

    def _json_schema(self) -> str | None:
        kind = (self.response_format or {}).get("type")
        if kind == "json_object":
            return JSON_OBJECT
        return (self.response_format or {}).get("schema") if kind == "json_schema" else None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    """Text, texts, token ids or lists of token ids (strict: `true` is no token id)."""
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = Field(False, description="not supported: must be false")

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        """One clear message for a prompt of the wrong shape, rather than pydantic's errors
        for each member of the union."""
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")

        def ids(x: Any) -> bool:
            return isinstance(x, list) and all(type(i) is int for i in x)

        if not (
            isinstance(v, str)
            or (isinstance(v, list) and (all(isinstance(x, str) for x in v) or ids(v)))
            or (isinstance(v, list) and all(ids(x) for x in v))
        ):
            raise ValueError(
                "prompt must be a string, a list of strings, a list of token ids (integers) "
                "or a list of such lists"
            )
        return _check_text(v)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    def sampling_params(self, default_max: int) -> SamplingParams:
        return self._params(self.max_tokens or default_max, self.logprobs)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        """Say what is missing for a part that is not text, rather than pydantic's union
        errors."""
        for part in v if isinstance(v, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image_url", "input_image", "input_audio", "file"):
                what = "image" if "image" in kind else "audio" if "audio" in kind else "file"
                raise ValueError(f"{what} content is not supported by this model (text only)")
            if kind != "text":
                raise ValueError(f"content part type {kind!r} is not supported: use 'text'")
            _check_text(part.get("text"))
        return _check_text(v)

    def text(self) -> str:
        return (
            self.content
            if isinstance(self.content, str)
            else "".join(p.text for p in self.content if isinstance(p, TextPart))
        )


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def conversation(self) -> list[dict[str, str]]:
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]

    def sampling_params(self, default_max: int) -> SamplingParams:
        lp = (self.top_logprobs or 0) if self.logprobs else None
        return self._params(self.max_completion_tokens or self.max_tokens or default_max, lp)


class FlipRequest(BaseModel):
    """POST /admin/flip: turn an instance to another role (cluster/flip.py)."""

    model_config = ConfigDict(extra="forbid")
    instance: str
    role: Literal["prefill", "decode", "colocated"]
