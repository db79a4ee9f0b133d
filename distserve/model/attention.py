"""Attention over the paged KV cache, for a batch that mixes prompt chunks and decode
tokens.

Token layout of a batch (T tokens): prompt chunks first, then one token per decode

    [ chunk 0 (n0 tokens) | chunk 1 (n1) | ... | decode 0 | decode 1 | ... ]
      <------------- num_prefill_tokens ----------->  <-- num_decodes -->

Cache layout of one layer: [2 (K, V), num_blocks, block_size, num_kv_heads, head_dim];
token position p of a request lives in block table[p // block_size], slot p % block_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    """One prompt chunk inside the batch."""

    offset: int
    """First row of the chunk in the batch's token dimension."""
    num_tokens: int
    start: int
    """Position of its first token; > 0 means earlier KV is read from the cache."""
    context_slots: torch.Tensor | None = None
    """[start + num_tokens] flat cache slots of positions 0 .. start+n-1 (when start > 0)."""


@dataclass
class AttentionMetadata:
    """Where each token of a batch writes its KV and what it attends to. Built once per
    step by the model runner and shared by all layers."""

    slot_mapping: torch.Tensor
    """[T] flat cache slot (block * block_size + offset) of every token of the batch."""
    prefills: list[PrefillSpan]
    num_prefill_tokens: int
    decode_slots: torch.Tensor | None = None
    """[B, L] flat cache slots of positions 0 .. L-1 of every decode (padded with 0)."""
    decode_mask: torch.Tensor | None = None
    """[B, 1, 1, L] True where a decode may attend (position < its context length)."""


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store k, v [T, kv_heads, head_dim] into their slots of one layer's cache."""
    _, nb, bs, kvh, d = cache.shape
    cache[0].view(nb * bs, kvh, d).index_copy_(0, slots, k)
    cache[1].view(nb * bs, kvh, d).index_copy_(0, slots, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q [T, heads, d], k/v [T, kv_heads, d] of the batch's new tokens -> [T, heads, d].

    Writes the new K/V into the cache first, then each prompt chunk attends causally to
    its request's KV and each decode token to its whole context."""
    write_kv(cache, k, v, meta.slot_mapping)
    _, nb, bs, kvh, d = cache.shape
    k_flat = cache[0].view(nb * bs, kvh, d)
    v_flat = cache[1].view(nb * bs, kvh, d)
    out = torch.empty_like(q)
    for span in meta.prefills:
        rows = slice(span.offset, span.offset + span.num_tokens)
        qs = q[rows].transpose(0, 1)  # [heads, n, d]
        if span.start == 0:
            ks, vs = k[rows].transpose(0, 1), v[rows].transpose(0, 1)  # [kv_heads, n, d]
            o = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            assert span.context_slots is not None
            ks = k_flat[span.context_slots].transpose(0, 1)  # [kv_heads, start+n, d]
            vs = v_flat[span.context_slots].transpose(0, 1)
            q_pos = torch.arange(span.start, span.start + span.num_tokens, device=q.device)
            k_pos = torch.arange(span.start + span.num_tokens, device=q.device)
            mask = k_pos[None, :] <= q_pos[:, None]  # [n, start+n]
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True
            )
        out[rows] = o.transpose(0, 1)
    if meta.decode_slots is not None:
        p = meta.num_prefill_tokens
        qd = q[p:].unsqueeze(2)  # [B, heads, 1, d]
        kd = k_flat[meta.decode_slots].transpose(1, 2)  # [B, kv_heads, L, d]
        vd = v_flat[meta.decode_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True
        )
        out[p:] = o.squeeze(2)
    return out
