"""Turns the logits of a batch into tokens: greedy, temperature, top-k, top-p, seeds,
and log-probabilities of the raw distribution."""

from __future__ import annotations

import numpy as np
import torch

from distserve.core import SamplingParams, TokenLogprobs

_GOLDEN = 0x9E3779B97F4A7C15


def seed_for(seed: int, output_index: int) -> int:
    """The generator seed of one (request seed, output position): sampling a seeded
    request never depends on what else was in the batch or on which instance ran it."""
    return (seed * _GOLDEN + output_index) % (2**63)


def apply_allowed(logits: torch.Tensor, allowed: list[bytes | None]) -> torch.Tensor:
    """A copy of `logits` [N, vocab] with -inf for every token a row's bitmask leaves out
    (bit i % 8 of byte i // 8: token i; rows with None keep every token)."""
    rows = [i for i, a in enumerate(allowed) if a is not None]
    vocab = logits.shape[1]
    packed = np.zeros((len(rows), -(-vocab // 8)), dtype=np.uint8)
    for j, i in enumerate(rows):
        mask = np.frombuffer(allowed[i] or b"", dtype=np.uint8)[: packed.shape[1]]
        packed[j, : len(mask)] = mask
    bits = np.unpackbits(packed, axis=1, count=vocab, bitorder="little")
    keep = torch.from_numpy(bits).view(torch.bool).to(logits.device)
    if len(rows) == len(allowed):
        return logits.masked_fill(keep.logical_not(), float("-inf"))
    out = logits.clone()
    out[rows] = logits[rows].masked_fill(keep.logical_not(), float("-inf"))
    return out


class Sampler:
    """Samples one token per row. Unseeded rows draw from one engine-wide generator."""

    def __init__(self, device: str | torch.device = "cpu", seed: int = 0) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        output_indices: list[int],
        allowed: list[bytes | None] | None = None,
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits [N, vocab] float32 -> N tokens and N optional log-probabilities (of the
        raw distribution). `allowed`: per row, a bitmask of the tokens it may pick
        (`ScheduledChunk.allowed_tokens`), or None for any."""
        raw = logits
        if allowed is not None and any(a is not None for a in allowed):
            logits = apply_allowed(logits, allowed)
        tokens = logits.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            sub = [params[i] for i in rows]
            probs = self._filtered_probs(logits[rows], sub)
            noise = torch.empty_like(probs)
            for j, (i, p) in enumerate(zip(rows, sub, strict=True)):
                gen = self.generator
                if p.seed is not None:
                    gen = torch.Generator(self.device).manual_seed(
                        seed_for(p.seed, output_indices[i])
                    )
                noise[j].exponential_(generator=gen)
            # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race).
            tokens[rows] = (probs / noise).argmax(dim=-1)
        token_list = tokens.tolist()
        return token_list, self._logprobs(raw, params, token_list)

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        temps = torch.tensor([p.temperature for p in params], device=logits.device)
        x = logits / temps[:, None]
        ks = [p.effective_top_k for p in params]
        if any(ks):
            vocab = x.shape[-1]
            k = torch.tensor([min(k, vocab) if k else vocab for k in ks], device=x.device)
            top = x.topk(int(k.max()), dim=-1).values  # [N, max k], sorted descending
            kth = top.gather(1, (k - 1).clamp(max=top.shape[1] - 1)[:, None])
            x = x.masked_fill(x < kth, float("-inf"))
        top_ps = [p.top_p for p in params]
        if any(tp < 1.0 for tp in top_ps):
            srt, idx = x.sort(dim=-1, descending=True)
            probs = srt.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
            tp = torch.tensor(top_ps, device=x.device)[:, None]
            srt = srt.masked_fill(before > tp, float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter(1, idx, srt)
        return x.softmax(dim=-1)

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, params: list[SamplingParams], tokens: list[int]
    ) -> list[TokenLogprobs | None]:
        out: list[TokenLogprobs | None] = [None] * len(params)
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return out
        lp = logits[rows].log_softmax(dim=-1)
        k = max(params[i].logprobs or 0 for i in rows)
        top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        for j, i in enumerate(rows):
            n = params[i].logprobs or 0
            top = tuple(zip(top_i[j, :n].tolist(), top_v[j, :n].tolist(), strict=True))
            out[i] = TokenLogprobs(tokens[i], float(lp[j, tokens[i]]), top)
        return out
