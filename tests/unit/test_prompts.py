"""The routes' prompt encoder: a prompt that cannot fit the context is refused by its
length before it is tokenized; a large one is tokenized off the event loop's thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from distserve.model.tokenizer import Tokenizer
from distserve.server.errors import APIError
from distserve.server.prompts import SLACK, THREAD_CHARS, PromptEncoder


class _Recording:
    """A byte tokenizer that records the thread of every encode."""

    def __init__(self) -> None:
        self.inner = Tokenizer.bytes_only(300)
        self.max_token_chars = self.inner.max_token_chars
        self.threads: list[int] = []

    def encode(self, text: str) -> list[int]:
        self.threads.append(threading.get_ident())
        return self.inner.encode(text)


def test_a_prompt_that_cannot_fit_is_refused_without_tokenizing() -> None:
    tok = _Recording()
    enc = PromptEncoder(tok, max_model_len=THREAD_CHARS)
    with pytest.raises(APIError) as e:
        asyncio.run(enc.encode("x" * (SLACK * (THREAD_CHARS - 1) + 1)))
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"
    assert tok.threads == []


def test_large_prompts_are_tokenized_in_a_thread_small_ones_inline() -> None:
    tok = _Recording()
    enc = PromptEncoder(tok, max_model_len=4 * THREAD_CHARS)

    async def run() -> tuple[list[int], list[int], int]:
        small = await enc.encode("hi")
        large = await enc.encode("y" * (THREAD_CHARS + 1))
        return small, large, threading.get_ident()

    small, large, loop_thread = asyncio.run(run())
    assert small == list(b"hi") and len(large) == THREAD_CHARS + 1
    assert tok.threads[0] == loop_thread and tok.threads[1] != loop_thread


def test_max_token_chars_is_the_longest_vocabulary_entry() -> None:
    words = {"▁the": 0, "ĠĠĠĠĠĠĠĠ": 1, "a": 2}

    class Backend:
        def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
            return words

    tok = Tokenizer(Backend(), bos_token_id=None, eos_token_id=None, chat_template=None)
    assert tok.max_token_chars == 8
    assert Tokenizer.bytes_only(300).max_token_chars == 1
