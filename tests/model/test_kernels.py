"""The compiled decode-attention kernel equals the plain-torch reference path."""

from __future__ import annotations

import shutil

import pytest
import torch

from distserve.model import kernels
from distserve.model.attention import AttentionMetadata, decode_attention_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def kern():
    mod = kernels.cpu_kernels()
    assert mod is not None, "the CPU kernels failed to build (see the warning)"
    return mod


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 1), (10, 2)])
@pytest.mark.parametrize("d,bs", [(32, 4), (64, 16), (64, 5), (128, 16)])
def test_kernel_matches_reference(
    kern, dtype: torch.dtype, heads: int, kv_heads: int, d: int, bs: int
) -> None:
    """Both paths (portable, and AVX512-BF16 for bf16 with d = 64 or 128): query heads
    per KV head from 1 to 8 (more than one pass of 4), partial chunks and blocks."""
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    nb = 8 * 25 + 3
    cache = torch.randn(2, kv_heads, nb * bs, d, generator=g).to(dtype)
    lens = torch.tensor([1, 5, 17, 31, 2, 16, 33, 100])  # partial blocks and chunks
    width = int(-(-lens.max() // bs))
    tables = torch.randperm(nb, generator=g)[: len(lens) * width].view(len(lens), width)
    q = torch.randn(len(lens), heads, d, generator=g).to(dtype)
    meta = AttentionMetadata(torch.empty(0), [], 0, bs, tables, lens)
    ref = decode_attention_reference(q, cache, meta, d**-0.5)
    out = kern.paged_decode_attention(q, cache, tables, lens, bs, d**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.float() - ref.float()).abs().max().item() < TOL[dtype]


def test_padding_blocks_are_never_read(kern) -> None:
    """Entries of the block table past a request's length may be garbage ids."""
    d, bs = 16, 4
    cache = torch.randn(2, 2, 8 * bs, d)
    lens = torch.tensor([6])
    good = torch.tensor([[3, 5, 0, 0]])
    bad = torch.tensor([[3, 5, 7, 1]])
    q = torch.randn(1, 4, d)
    a = kern.paged_decode_attention(q, cache, good, lens, bs, 0.25)
    b = kern.paged_decode_attention(q, cache, bad, lens, bs, 0.25)
    assert torch.equal(a, b)


@pytest.mark.slow  # engine steps through the compiled kernels
def test_engine_output_same_with_and_without_kernels(monkeypatch, make_engine) -> None:
    from distserve.config import EngineConfig
    from distserve.core import CacheConfig, SamplingParams, SchedulerConfig

    config = EngineConfig(
        model="opt-125m",
        load_format="random",
        dtype="float32",
        cache=CacheConfig(num_blocks=64),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512, max_model_len=512),
    )
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)

    def run() -> list[tuple[list[int], list[float]]]:
        eng = make_engine(config)
        ids = [eng.add_request(list(range(5 + 7 * i, 30 + 9 * i)), params) for i in range(3)]
        done = {}
        while eng.has_unfinished():
            done.update({o.request_id: o for o in eng.step() if o.finished})
        return [(done[i].token_ids, [lp.logprob for lp in done[i].logprobs]) for i in ids]

    with_kernels = run()
    monkeypatch.setenv("DISTSERVE_KERNELS", "0")
    kernels.cpu_kernels.cache_clear()
    try:
        without = run()
    finally:
        monkeypatch.delenv("DISTSERVE_KERNELS")
        kernels.cpu_kernels.cache_clear()
    for (ta, la), (tb, lb) in zip(with_kernels, without, strict=True):
        assert ta == tb
        assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) < 1e-4


def test_failed_build_falls_back_to_torch_with_a_warning(monkeypatch) -> None:
    import torch.utils.cpp_extension as ext

    from distserve.model.layers import Linear

    def no_compiler(**kwargs: object) -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(ext, "load", no_compiler)
    kernels.cpu_kernels.cache_clear()
    kernels.bf16_linear_kernels.cache_clear()
    try:
        with pytest.warns(UserWarning, match="plain torch .*no C\\+\\+ compiler"):
            assert kernels.cpu_kernels() is None
        assert kernels.bf16_linear_kernels() is None
        lin = Linear(8, 4).to(torch.bfloat16)
        lin.pack()
        assert lin.packed is None  # the reference path runs
        x = torch.ones(2, 8, dtype=torch.bfloat16)
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    finally:
        monkeypatch.undo()
        kernels.cpu_kernels.cache_clear()
        kernels.bf16_linear_kernels.cache_clear()


def test_build_name_is_keyed_by_sources_and_torch_version(tmp_path, monkeypatch) -> None:
    # Two installs on one machine share torch's build cache: a build named by content keeps
    # each its own build, where a fixed name made them rebuild over each other.
    name = kernels.build_name("2.13.0")
    assert name == kernels.build_name("2.13.0")
    assert name != kernels.build_name("2.14.0")
    shutil.copytree(kernels._SRC, tmp_path, dirs_exist_ok=True)  # noqa: SLF001
    monkeypatch.setattr(kernels, "_SRC", str(tmp_path))
    assert kernels.build_name("2.13.0") == name  # same content, other place: same build
    (tmp_path / "linear.cpp").write_bytes(b"// changed\n" + (tmp_path / "linear.cpp").read_bytes())
    assert kernels.build_name("2.13.0") != name
