"""Attention over the paged KV cache, for a batch that mixes prompt chunks and decode
tokens.

Token layout of a batch (T tokens): prompt chunks first, then one token per decode

    [ chunk 0 (n0 tokens) | chunk 1 (n1) | ... | decode 0 | decode 1 | ... ]
      <------------- num_prefill_tokens ----------->  <-- num_decodes -->

Cache layout of one layer: [2 (K, V), num_kv_heads, num_blocks * block_size, head_dim];
token position p of a request lives in slot table[p // block_size] * block_size +
p % block_size. KV heads outermost, so that gathering a batch's slots gives
[kv_heads, B, L, d]: contiguous matrices per (head, request), ready for batched matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from distserve.model.kernels import bf16_linear_kernels, cpu_kernels

_KERNEL_DTYPES = (torch.bfloat16, torch.float32)


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
    block_size: int = 16
    decode_blocks: torch.Tensor | None = None
    """[B, W] block tables of the decodes, cut to the W blocks of the longest context and
    padded with block 0 (never read past a request's length)."""
    decode_lens: torch.Tensor | None = None
    """[B] context length of each decode, its new token included."""
    decode_bias: torch.Tensor | None = None
    """[1, B, 1, W * block_size] float32, 0 where a decode may attend and -inf on the
    padding; built on first use by the reference path."""


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store k, v [T, kv_heads, head_dim] into their slots of one layer's cache."""
    cache[0].index_copy_(1, slots, k.transpose(0, 1))
    cache[1].index_copy_(1, slots, v.transpose(0, 1))


def rotate_and_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    rope: Any,
    cache: torch.Tensor,
    meta: AttentionMetadata,
    num_heads: int,
    num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused projection qkv [T, (heads + 2 kv_heads) d] into q [T, heads, d] and
    k, v [T, kv_heads, d], rotate q and k by their positions (`rope`, a RotaryEmbedding),
    and store k and v in their cache slots. The fast path does it in one kernel, in place
    in qkv (q, k, v are views of it); the reference with torch ops."""
    t, d = qkv.shape[0], cache.shape[-1]
    kernels = bf16_linear_kernels() if qkv.dtype == torch.bfloat16 else None
    if kernels is not None and qkv.device.type == "cpu" and qkv.stride(1) == 1:
        kernels.rope_store_kv_bf16(
            qkv, positions, rope.cos, rope.sin, cache, meta.slot_mapping, num_heads, num_kv_heads
        )
        q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
        return q.view(t, num_heads, d), k.view(t, num_kv_heads, d), v.view(t, num_kv_heads, d)
    q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    q, k = rope(positions, q.view(t, num_heads, d), k.view(t, num_kv_heads, d))
    v = v.view(t, num_kv_heads, d)
    write_kv(cache, k, v, meta.slot_mapping)
    return q, k, v


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q [T, heads, d], k/v [T, kv_heads, d] of the batch's new tokens -> [T, heads, d].

    Writes the new K/V into the cache first, then `attend`."""
    write_kv(cache, k, v, meta.slot_mapping)
    return attend(q, k, v, cache, meta, scale)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of the batch's new tokens whose K/V are already in the cache: each prompt
    chunk attends causally to its request's KV, each decode token to its whole context."""
    if not meta.prefills:
        return decode_attention(q, cache, meta, scale)
    out = torch.empty_like(q)
    for span in meta.prefills:
        rows = slice(span.offset, span.offset + span.num_tokens)
        out[rows] = prefill_attention(q[rows], k[rows], v[rows], cache, span, scale)
    if meta.decode_blocks is not None:
        p = meta.num_prefill_tokens
        out[p:] = decode_attention(q[p:], cache, meta, scale)
    return out


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    span: PrefillSpan,
    scale: float,
) -> torch.Tensor:
    """One prompt chunk attends causally to its request's KV: q [n, heads, d], k/v
    [n, kv_heads, d] (its new tokens) -> [n, heads, d]. In bf16 with heads of 64 or 128 the
    compiled kernel runs, over the chunk's own K/V or, after a prefix-cache hit or an
    earlier chunk, over its context gathered from the cache; else the reference (SDPA)."""
    fast = bf16_linear_kernels() if q.dtype == torch.bfloat16 and q.device.type == "cpu" else None
    if fast is not None and q.shape[-1] in (64, 128):
        if span.start == 0:
            return fast.causal_prompt_attention(q, k, v, scale)  # type: ignore[no-any-return]
        assert span.context_slots is not None
        ks = cache[0].index_select(1, span.context_slots).transpose(0, 1)  # [start+n, kvh, d]
        vs = cache[1].index_select(1, span.context_slots).transpose(0, 1)
        return fast.causal_prompt_attention(q, ks, vs, scale)  # type: ignore[no-any-return]
    return prefill_attention_reference(q, k, v, cache, span, scale)


def prefill_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    span: PrefillSpan,
    scale: float,
) -> torch.Tensor:
    """Plain torch: SDPA over the chunk's own K/V (start 0) or over its request's whole
    context gathered from the cache (a later chunk of a chunked prefill)."""
    # SDPA on CPU takes its fast kernel only for 4-D inputs: [1, heads, n, d].
    qs = q.transpose(0, 1).unsqueeze(0)
    if span.start == 0:
        ks = k.transpose(0, 1).unsqueeze(0)  # [1, kv_heads, n, d]
        vs = v.transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        return o[0].transpose(0, 1)
    assert span.context_slots is not None
    ks = cache[0].index_select(1, span.context_slots).unsqueeze(0)  # [1, kvh, start+n, d]
    vs = cache[1].index_select(1, span.context_slots).unsqueeze(0)
    q_pos = torch.arange(span.start, span.start + span.num_tokens, device=q.device)
    k_pos = torch.arange(span.start + span.num_tokens, device=q.device)
    mask = k_pos[None, :] <= q_pos[:, None]  # [n, start+n]
    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


def decode_attention(
    q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """One query per request against its whole context: q [B, heads, d] -> [B, heads, d].
    The compiled kernel when it is available, else the plain-torch reference."""
    assert meta.decode_blocks is not None and meta.decode_lens is not None
    kernels = cpu_kernels() if q.device.type == "cpu" and q.dtype in _KERNEL_DTYPES else None
    if kernels is not None:
        return kernels.paged_decode_attention(  # type: ignore[no-any-return]
            q, cache, meta.decode_blocks, meta.decode_lens, meta.block_size, scale
        )
    return decode_attention_reference(q, cache, meta, scale)


def decode_attention_reference(
    q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Plain torch: gather each request's blocks, then batched matmuls.

    Grouped-query attention without repeating K/V: the G = heads / kv_heads query heads
    that share a KV head form one small matrix per (KV head, request). (CPU SDPA is slow
    for single-token queries, so this is written out.)"""
    assert meta.decode_blocks is not None and meta.decode_lens is not None
    b, heads, d = q.shape
    kvh = cache.shape[1]
    g = heads // kvh
    length = meta.decode_blocks.shape[1] * meta.block_size
    if meta.decode_bias is None:
        pad = torch.arange(length, device=q.device)[None, :] >= meta.decode_lens[:, None]
        bias = torch.zeros(pad.shape, dtype=torch.float32, device=q.device)
        meta.decode_bias = bias.masked_fill_(pad, float("-inf"))[None, :, None, :]
    # Gather whole blocks (contiguous block_size * d runs): [kv_heads, B * W, bs * d].
    blocks = cache.view(2, kvh, -1, meta.block_size * d)
    flat = meta.decode_blocks.flatten()
    kd = blocks[0].index_select(1, flat).view(kvh * b, length, d)  # [kv_heads*B, L, d]
    vd = blocks[1].index_select(1, flat).view(kvh * b, length, d)
    qg = q.view(b, kvh, g, d).transpose(0, 1).reshape(kvh * b, g, d)
    scores = torch.bmm(qg, kd.transpose(1, 2)).float() * scale  # [kv_heads*B, G, L]
    scores = scores.view(kvh, b, g, length) + meta.decode_bias
    probs = scores.softmax(dim=-1).to(q.dtype).view(kvh * b, g, length)
    out = torch.bmm(probs, vd)  # [kv_heads*B, G, d]
    return out.view(kvh, b, g, d).transpose(0, 1).reshape(b, heads, d)


class BiasedMHA(torch.nn.Module):
    """Multi-head attention with one fused, biased QKV projection and a biased output
    projection (OPT, GPT-2): x [T, hidden] -> [T, hidden]."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, hidden // heads
        self.qkv_proj = torch.nn.Linear(hidden, 3 * hidden)
        self.o_proj = torch.nn.Linear(hidden, hidden)
        self.scale = self.head_dim**-0.5

    def forward(
        self, x: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = (
            y.view(t, self.num_heads, self.head_dim) for y in self.qkv_proj(x).chunk(3, dim=-1)
        )
        return self.o_proj(paged_attention(q, k, v, cache, meta, self.scale).reshape(t, -1))
