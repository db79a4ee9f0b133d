"""Incremental detokenization with stop strings.

Text is released as tokens arrive, except (a) an incomplete UTF-8 sequence at the end
(byte-level BPE splits characters across tokens) and (b) a tail that could still become
a stop string; both are held back until resolved.
"""

from __future__ import annotations

from distserve.model.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Decodes one request's output tokens as they come."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        """All text decoded so far (after a stop match: cut before it)."""
        self.num_emitted = 0
        """Characters of `text` already handed out."""
        self.stopped = False
        self._prefix = 0  # token window start: decoding from here reproduces the text's tail
        self._read = 0  # tokens whose text is in `text`

    def add(self, token_ids: list[int]) -> str:
        """Take new tokens; return the text that can be released now."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        now = self.tokenizer.decode(self.ids[self._prefix :])
        if now.endswith("\ufffd") or len(now) < len(before):
            return ""  # a character is still incomplete
        start = len(self.text)
        self.text += now[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        if self.stop:
            self._cut_at_stop(max(0, start - max(map(len, self.stop)) + 1))
        return self._release(final=self.stopped)

    def flush(self) -> str:
        """The request finished: release everything held back (stop-string prefixes)."""
        if not self.stopped:
            rest = self.tokenizer.decode(self.ids[self._prefix :])
            before = self.tokenizer.decode(self.ids[self._prefix : self._read])
            self.text += rest[len(before) :]
            self._read = len(self.ids)
        return self._release(final=True)

    def _cut_at_stop(self, search_from: int) -> None:
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held_back()
        end = max(end, self.num_emitted)
        out = self.text[self.num_emitted : end]
        self.num_emitted = end
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
