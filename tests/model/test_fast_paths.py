"""Each compiled bf16 fast path equals its plain-torch reference path: the packed linear
layers (plain, with bias, with a residual, with SiLU-and-multiply), RMSNorm, rotary
embedding plus the KV-cache store, and a whole Llama forward pass."""

from __future__ import annotations

import sys

import pytest
import torch

from distserve.model import kernels
from distserve.model.attention import AttentionMetadata, rotate_and_store, write_kv
from distserve.model.layers import GateUpProj, Linear, RMSNorm, RotaryEmbedding
from distserve.model.packed import PackedLinear, pack_weight, reference

pytestmark = pytest.mark.skipif(
    kernels.bf16_linear_kernels() is None, reason="needs the AVX512-BF16 kernels"
)
BF16 = torch.bfloat16


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-2) -> None:
    """bf16 results of sums taken in a different order: within ~1 bf16 ulp."""
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def _randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(BF16)


def test_pack_layout() -> None:
    w = torch.arange(70 * 5, dtype=torch.float32).view(70, 5).to(BF16)
    p = pack_weight(w)
    assert p.shape == (2, 3, 64, 2)
    assert p[1, 2, 3, 0] == w[64 + 3, 4] and p[1, 2, 3, 1] == 0  # K padded with zeros
    assert p[0, 1, 7, 1] == w[7, 3]
    assert torch.all(p[1, :, 6:] == 0)  # N padded with zero rows


@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 13, 31, 64, 100])
@pytest.mark.parametrize("n,k", [(45, 37), (64, 64), (960, 576), (130, 1)])
def test_linear_matches_reference(m: int, n: int, k: int) -> None:
    w, x = _randn(n, k, seed=1, scale=0.1), _randn(m, k, seed=2)
    b, res = _randn(n, seed=3), _randn(m, n, seed=4)
    plain, biased = PackedLinear(w, None, False), PackedLinear(w, b, False)
    _close(plain(x), reference(x, w))
    _close(biased(x), reference(x, w, b))
    _close(plain(x, res), reference(x, w, None, res))
    _close(biased(x, res), reference(x, w, b, res))


def test_linear_reads_strided_rows() -> None:
    w, x = _randn(96, 40, seed=1), _randn(9, 100, seed=2)[:, 30:70]  # rows 100 apart
    _close(PackedLinear(w, None, False)(x), reference(x, w))


@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("hidden,inter", [(576, 1536), (40, 40), (33, 70)])
def test_gate_up_silu_matches_reference(m: int, hidden: int, inter: int) -> None:
    proj = GateUpProj(hidden, inter, "silu").to(BF16)
    with torch.no_grad():
        proj.weight.copy_(_randn(2 * inter, hidden, seed=5, scale=0.2))
    x = _randn(m, hidden, seed=6)
    proj.pack(False)
    ref = proj(x)
    proj.pack()
    assert proj.packed is not None
    _close(proj(x), ref)


def test_linear_module_switches_paths() -> None:
    lin = Linear(50, 70).to(BF16)
    with torch.no_grad():
        lin.weight.copy_(_randn(70, 50, seed=7, scale=0.1))
        lin.bias.copy_(_randn(70, seed=8))
    x, res = _randn(3, 50, seed=9), _randn(3, 70, seed=10)
    ref = lin(x, res)
    lin.pack()
    assert lin.packed is not None
    _close(lin(x, res), ref)
    lin.float().pack()  # float32 weights: no fast path
    assert lin.packed is None


def test_linear_takes_the_kernel_only_up_to_max_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above `max_rows` the module runs torch's path: the packed copy, zeroed here, is
    not read at 3 rows with a limit of 2, and is at a limit of 3."""
    from distserve.model.packed import ROW_PROBES

    lin = Linear(50, 70, bias=False).to(BF16)
    with torch.no_grad():
        lin.weight.copy_(_randn(70, 50, seed=7, scale=0.1))
    x = _randn(3, 50, seed=9)
    ref = lin(x)
    lin.pack()
    assert lin.packed is not None
    lin.packed.weight.zero_()
    monkeypatch.setenv("DISTSERVE_PACKED_MAX_ROWS", "2")
    _close(lin(x), ref)
    monkeypatch.setenv("DISTSERVE_PACKED_MAX_ROWS", "3")
    assert lin(x).abs().max().item() == 0
    monkeypatch.delenv("DISTSERVE_PACKED_MAX_ROWS")
    rows = lin.packed.max_rows(lin.weight)  # measured on this CPU, then kept
    assert rows in (0, *ROW_PROBES, sys.maxsize)
    assert lin.packed.max_rows(lin.weight) == rows


@pytest.mark.parametrize("hidden", [576, 37, 16])
def test_rms_norm_matches_reference(hidden: int) -> None:
    norm = RMSNorm(hidden, 1e-5).to(BF16)
    with torch.no_grad():
        norm.weight.copy_(_randn(hidden, seed=11))
    x = _randn(9, hidden, seed=12, scale=3.0)
    _close(norm(x), norm.reference(x))


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (4, 1, 32), (2, 2, 20)])
def test_rotate_and_store_matches_reference(heads: int, kv_heads: int, d: int) -> None:
    t, bs, nb = 11, 4, 8
    rope = RotaryEmbedding(d, 64, 10000.0, None)
    qkv = _randn(t, (heads + 2 * kv_heads) * d, seed=13)
    positions = torch.tensor([0, 1, 2, 3, 4, 9, 17, 33, 40, 50, 63])
    slots = torch.randperm(nb * bs, generator=torch.Generator().manual_seed(14))[:t]
    meta = AttentionMetadata(slots, [], t, bs)
    cache_ref = torch.zeros(2, kv_heads, nb * bs, d, dtype=BF16)
    cache_fast = cache_ref.clone()
    q_ref, k_ref = rope(
        positions,
        qkv[:, : heads * d].reshape(t, heads, d),
        qkv[:, heads * d : (heads + kv_heads) * d].reshape(t, kv_heads, d),
    )
    write_kv(cache_ref, k_ref, qkv[:, (heads + kv_heads) * d :].reshape(t, kv_heads, d), slots)
    q, k, _ = rotate_and_store(qkv.clone(), positions, rope, cache_fast, meta, heads, kv_heads)
    # Elementwise in bf16 with the reference's rounding: equal to the bit.
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    assert torch.equal(cache_fast, cache_ref)


@pytest.mark.parametrize("n", [1, 5, 16, 37, 200])
@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (8, 1, 128), (4, 4, 64)])
def test_prompt_attention_matches_reference(n: int, heads: int, kv_heads: int, d: int) -> None:
    """Causal attention of a whole prompt, read from strided views of a fused QKV."""
    from distserve.model.attention import PrefillSpan, prefill_attention_reference

    qkv = _randn(n, (heads + 2 * kv_heads) * d, seed=n)
    q = qkv[:, : heads * d].view(n, heads, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(n, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d :].view(n, kv_heads, d)
    ref = prefill_attention_reference(q, k, v, torch.empty(0), PrefillSpan(0, n, 0), d**-0.5)
    fast = kernels.bf16_linear_kernels().causal_prompt_attention(q, k, v, d**-0.5)
    _close(fast, ref, 2e-2)


@pytest.mark.parametrize("start,n", [(16, 1), (16, 37), (48, 200), (160, 16), (5, 40)])
@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (8, 1, 128)])
def test_chunk_after_cached_context_matches_reference(
    start: int, n: int, heads: int, kv_heads: int, d: int
) -> None:
    """A chunk at positions start.. (after a prefix-cache hit or an earlier chunk) attends
    to its context in a paged cache: the compiled kernel equals the masked SDPA reference."""
    from distserve.model.attention import (
        PrefillSpan,
        prefill_attention,
        prefill_attention_reference,
    )

    bs, total = 16, start + n
    table = torch.randperm(40, generator=torch.Generator().manual_seed(start))[: -(-total // bs)]
    pos = torch.arange(total)
    slots = table[pos // bs] * bs + pos % bs
    cache = _randn(2 * kv_heads * 40 * bs, d, seed=total).view(2, kv_heads, 40 * bs, d)
    q = _randn(n, heads * d, seed=n + 1).view(n, heads, d)
    new = cache[:, :, slots[start:]].transpose(1, 2)  # [2, n, kvh, d]: already stored
    span = PrefillSpan(0, n, start, slots)
    ref = prefill_attention_reference(q, new[0], new[1], cache, span, d**-0.5)
    fast = prefill_attention(q, new[0], new[1], cache, span, d**-0.5)
    _close(fast, ref, 2e-2)


@pytest.mark.slow  # a whole forward pass through the compiled kernels
def test_llama_forward_fast_equals_reference() -> None:
    """A whole bf16 Llama step (prefill, then decode over the paged cache): logits of the
    fast paths and of the reference paths agree."""
    from distserve.model.config import ModelConfig
    from distserve.model.loader import load
    from distserve.model.registry import ModelSource

    cfg = ModelConfig(
        arch="llama", vocab_size=300, hidden_size=128, num_layers=2, num_heads=6,
        num_kv_heads=2, intermediate_size=200, max_position_embeddings=128, head_dim=64,
    )  # fmt: skip
    model = load(ModelSource("tiny", "random", None, cfg), "bfloat16").model
    bs, nb, n = 16, 8, 21
    table = torch.tensor([5, 2])
    pos = torch.arange(n)
    slots = table[pos // bs] * bs + pos % bs
    ids = torch.randint(0, 300, (n + 1,), generator=torch.Generator().manual_seed(15))

    def run() -> torch.Tensor:
        from distserve.model.attention import PrefillSpan

        caches = [torch.zeros(2, 2, nb * bs, 64, dtype=BF16) for _ in range(2)]
        meta = AttentionMetadata(slots, [PrefillSpan(0, n, 0)], n, bs)
        first = model.compute_logits(model(ids[:n], pos, caches, meta)[-1:])
        dmeta = AttentionMetadata(
            table[1:2] * bs + 5, [], 0, bs, table[None, :], torch.tensor([n + 1])
        )
        second = model.compute_logits(model(ids[n:], torch.tensor([n]), caches, dmeta))
        return torch.cat([first, second]).float()

    mp = pytest.MonkeyPatch()
    mp.setenv("DISTSERVE_PACKED_MAX_ROWS", "1000")  # every fast path, at every size
    with torch.inference_mode():
        fast = run()
        mp.undo()
        model.pack_weights(False)
        kernels.cpu_kernels.cache_clear()
        kernels.bf16_linear_kernels.cache_clear()
        mp = pytest.MonkeyPatch()
        mp.setenv("DISTSERVE_KERNELS", "0")
        try:
            ref = run()
        finally:
            mp.undo()
            kernels.cpu_kernels.cache_clear()
            kernels.bf16_linear_kernels.cache_clear()
    assert (fast - ref).abs().max().item() < 0.1 * ref.abs().max().item()
    assert torch.equal(fast.argmax(-1), ref.argmax(-1))
