"""Prompt text to token ids for the routes, without letting a huge prompt stall the
server: one that cannot fit the context by its length in characters is refused before it
is tokenized, and a large one is tokenized in a thread."""

from __future__ import annotations

import asyncio

from distserve.model.tokenizer import Tokenizer
from distserve.server.errors import APIError

THREAD_CHARS = 16_384
"""Prompts longer than this are tokenized in a thread (a 2 MB prompt takes ~1.6 s); the
hop costs more than tokenizing a short one."""
SLACK = 2
"""Normalization (e.g. NFC, which may merge characters) can shorten a text before it is
split into tokens: the bound on characters per token is doubled to stay on the safe side."""


class PromptEncoder:
    """Tokenizes prompts for a model whose context is `max_model_len` tokens."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self.max_chars = SLACK * tokenizer.max_token_chars * (max_model_len - 1)
        """Longer texts cannot fit: a token stands for at most `max_token_chars`
        characters, and a prompt leaves at least one position for its output."""

    async def encode(self, text: str, param: str = "prompt") -> list[int]:
        """The token ids of `text`; APIError 400 for one that cannot fit the context."""
        if len(text) > self.max_chars:
            raise APIError(
                400,
                f"the prompt has {len(text)} characters, more than the {self.max_model_len} "
                f"tokens of this model's context can hold",
                param,
                "context_length_exceeded",
            )
        if len(text) > THREAD_CHARS:
            # the tokenizer releases the GIL (Tokenizer.encode), so the event loop runs on
            return await asyncio.to_thread(self.tokenizer.encode, text)
        return self.tokenizer.encode(text)
