"""The link between the controller's process and an API process: pickled messages with a
length prefix over a Unix socket, and the compact form a request's outputs travel in.

A request's outputs cross as deltas (new text, new token ids, the finish), not as whole
RequestOutputs, which repeat the prompt's and the completion's token ids at every token:
the API process keeps the running text and ids (`Accumulator`)."""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

from distserve.runtime.outputs import RequestOutput

_LEN = struct.Struct("!I")
MAX_MESSAGE = 1 << 30


def pack(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> Any:
    """The next message; EOFError when the other side has closed the link."""
    try:
        head = await reader.readexactly(_LEN.size)
        (size,) = _LEN.unpack(head)
        if size > MAX_MESSAGE:
            raise EOFError(f"a message of {size} bytes: the link is corrupt")
        return pickle.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        raise EOFError("the link closed") from e


# stream items: (request id, kind, payload)
OUTPUT, END, FAILED = 0, 1, 2


def encode_item(request_id: str, item: RequestOutput | BaseException | None) -> tuple[Any, ...]:
    """One item of a request's output queue as it crosses the link."""
    if item is None:
        return (request_id, END)
    if isinstance(item, BaseException):
        return (request_id, FAILED, str(item))
    if not item.finished:
        return (request_id, OUTPUT, item.new_text, item.new_token_ids, item.new_logprobs)
    return (
        request_id,
        OUTPUT,
        item.new_text,
        item.new_token_ids,
        item.new_logprobs,
        item.finish_reason,
        item.timestamps,
        item.num_cached_tokens,
    )


class Accumulator:
    """A request's outputs rebuilt from its deltas, in the API process."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], logprobs: bool) -> None:
        self.request_id, self.prompt_token_ids = request_id, prompt_token_ids
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[Any] | None = [] if logprobs else None

    def output(self, item: tuple[Any, ...]) -> RequestOutput:
        new_text, new_ids, new_lps = item[2], item[3], item[4]
        self.text += new_text
        self.token_ids += new_ids
        if self.logprobs is not None and new_lps:
            self.logprobs += new_lps
        finished = len(item) > 5
        return RequestOutput(
            request_id=self.request_id,
            prompt=None,
            prompt_token_ids=self.prompt_token_ids,
            text=self.text,
            token_ids=list(self.token_ids) if finished else self.token_ids,
            new_text=new_text,
            new_token_ids=new_ids,
            finished=finished,
            finish_reason=item[5] if finished else None,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            new_logprobs=new_lps if self.logprobs is not None else None,
            timestamps=item[6] if finished else {},
            num_cached_tokens=item[7] if finished else 0,
        )
