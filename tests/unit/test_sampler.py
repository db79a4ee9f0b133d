"""The sampler on hand-made logits: greedy, temperature, top-k, top-p, seeds, logprobs."""

from __future__ import annotations

import pytest
import torch

from distserve.core import SamplingParams
from distserve.runtime.worker.sampler import Sampler

LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
N = 20000  # rows drawn at once; frequencies then sit within ~0.01 of the truth


def _freqs(params: SamplingParams, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    tokens, _ = Sampler(seed=3)(logits.repeat(N, 1), [params] * N, [0] * N)
    return torch.bincount(torch.tensor(tokens), minlength=logits.numel()).float() / N


def test_greedy_is_argmax() -> None:
    logits = torch.randn(16, 50)
    tokens, lps = Sampler()(logits, [SamplingParams(temperature=0)] * 16, [0] * 16)
    assert tokens == logits.argmax(-1).tolist()
    assert lps == [None] * 16


def test_temperature_one_follows_softmax() -> None:
    f = _freqs(SamplingParams(temperature=1.0))
    assert torch.allclose(f, LOGITS.softmax(-1), atol=0.015)


def test_temperature_sharpens() -> None:
    f = _freqs(SamplingParams(temperature=0.5))
    assert torch.allclose(f, (LOGITS / 0.5).softmax(-1), atol=0.015)


def test_top_k_renormalizes_over_the_k_best() -> None:
    f = _freqs(SamplingParams(temperature=1.0, top_k=2))
    assert f[2:].sum() == 0
    assert torch.allclose(f[:2], torch.tensor([0.625, 0.375]), atol=0.015)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    # Mass before each token: 0, 0.5, 0.8, 0.95 -> with p = 0.7 tokens 0 and 1 remain.
    f = _freqs(SamplingParams(temperature=1.0, top_p=0.7))
    assert f[2:].sum() == 0
    assert torch.allclose(f[:2], torch.tensor([0.625, 0.375]), atol=0.015)


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6)],
)
def test_degenerate_filters_are_greedy(params: SamplingParams) -> None:
    logits = torch.randn(64, 100)
    tokens, _ = Sampler()(logits, [params] * 64, [0] * 64)
    assert tokens == logits.argmax(-1).tolist()


def test_seeded_draw_ignores_batch_company_and_position() -> None:
    logits = torch.randn(1, 1000)
    p = SamplingParams(temperature=1.0, seed=42)
    alone, _ = Sampler(seed=0)(logits, [p], [5])
    others = SamplingParams(temperature=1.0)
    batch = torch.cat([torch.randn(3, 1000), logits, torch.randn(2, 1000)])
    mixed, _ = Sampler(seed=99)(batch, [others] * 3 + [p] + [others] * 2, [0, 1, 2, 5, 3, 4])
    assert mixed[3] == alone[0]
    draws = {Sampler()(logits, [p], [i])[0][0] for i in range(40)}
    assert len(draws) > 1, "different output positions must not reuse one draw"


def test_logprobs_are_log_softmax_of_raw_logits() -> None:
    logits = torch.randn(3, 30)
    params = [
        SamplingParams(temperature=0, logprobs=4),
        SamplingParams(temperature=0.7, logprobs=0),
        SamplingParams(temperature=0),
    ]
    tokens, lps = Sampler()(logits, params, [0, 0, 0])
    ref = logits.log_softmax(-1)
    a, b, c = lps
    assert a is not None and b is not None and c is None
    assert a.token_id == tokens[0] and abs(a.logprob - ref[0, tokens[0]].item()) < 1e-6
    assert [t for t, _ in a.top] == ref[0].topk(4).indices.tolist()
    assert all(abs(v - ref[0, t].item()) < 1e-6 for t, v in a.top)
    assert b.top == () and abs(b.logprob - ref[1, tokens[1]].item()) < 1e-6
