"""The API processes' link (server/ipc.py): messages survive the framing, and a request's
outputs rebuilt from deltas equal the controller's own, field by field the routes read."""

from __future__ import annotations

import asyncio

import pytest

from distserve.core import TokenLogprobs
from distserve.runtime.outputs import RequestOutput
from distserve.server import ipc


def _outputs(logprobs: bool) -> list[RequestOutput]:
    """A request's outputs as the controller makes them: cumulative text and ids."""
    prompt = [5, 6, 7]
    steps = [([11], "Hel"), ([12, 13], "lo wo"), ([14], ""), ([15], "rld!")]
    outs, text, ids, lps = [], "", [], []
    for k, (new_ids, new_text) in enumerate(steps):
        text += new_text
        ids += new_ids
        new_lps = [TokenLogprobs(t, -0.5 * t, ((t, -0.5 * t), (1, -9.0))) for t in new_ids]
        lps += new_lps
        last = k == len(steps) - 1
        outs.append(
            RequestOutput(
                request_id="r1",
                prompt=None,
                prompt_token_ids=prompt,
                text=text,
                token_ids=list(ids),
                new_text=new_text,
                new_token_ids=new_ids,
                finished=last,
                finish_reason="length" if last else None,
                logprobs=list(lps) if logprobs else None,
                new_logprobs=new_lps if logprobs else None,
                timestamps={"arrived": 1.0, "finished": 2.5} if last else {"arrived": 1.0},
                num_cached_tokens=2 if last else 0,
            )
        )
    return outs


@pytest.mark.parametrize("logprobs", [False, True])
def test_deltas_rebuild_every_field_the_routes_read(logprobs: bool) -> None:
    acc = ipc.Accumulator("r1", [5, 6, 7], logprobs)
    for out in _outputs(logprobs):
        got = acc.output(ipc.encode_item("r1", out))
        for name in ("text", "new_text", "token_ids", "new_token_ids", "finished"):
            assert getattr(got, name) == getattr(out, name), name
        assert got.prompt_token_ids == out.prompt_token_ids
        assert got.logprobs == out.logprobs and got.new_logprobs == out.new_logprobs
        if out.finished:
            assert got.finish_reason == out.finish_reason
            assert got.timestamps == out.timestamps
            assert got.num_cached_tokens == out.num_cached_tokens


def test_a_delta_does_not_carry_the_whole_request() -> None:
    """The point of deltas: an item's size does not grow with the prompt or the output."""
    out = _outputs(False)[1]
    long = RequestOutput(**{**out.__dict__, "prompt_token_ids": list(range(4000))})
    long.token_ids = list(range(2000))
    long.text = "x" * 8000
    assert len(ipc.pack(ipc.encode_item("r1", long))) == len(ipc.pack(ipc.encode_item("r1", out)))


def test_messages_cross_the_framing_whole_and_in_order() -> None:
    async def run() -> list[object]:
        reader = asyncio.StreamReader()
        messages = [("items", [("a", ipc.END)]), ("reply", 3, True, {"x": [1, 2]}), "z" * 70_000]
        data = b"".join(ipc.pack(m) for m in messages)
        for i in range(0, len(data), 1000):  # arriving in pieces, as on a socket
            reader.feed_data(data[i : i + 1000])
        reader.feed_eof()
        got = [await ipc.read_message(reader) for _ in messages]
        with pytest.raises(EOFError):
            await ipc.read_message(reader)
        return got

    assert asyncio.run(run()) == [
        ("items", [("a", ipc.END)]),
        ("reply", 3, True, {"x": [1, 2]}),
        "z" * 70_000,
    ]


def test_end_and_failure_items() -> None:
    assert ipc.encode_item("r", None) == ("r", ipc.END)
    assert ipc.encode_item("r", RuntimeError("gone")) == ("r", ipc.FAILED, "gone")
