"""Each model family against HF transformers on tiny random configs: same greedy tokens
for prompts of different lengths batched together, log-probabilities within 1e-4."""

from __future__ import annotations

import pytest
import torch

from distserve.config import EngineConfig
from distserve.core import CacheConfig, SamplingParams, SchedulerConfig
from distserve.model.loader import load
from distserve.model.registry import resolve
from tests.model.hf_reference import hf_greedy, tiny_hf_model

KINDS = ["llama", "llama3-rope", "llama-linear-rope", "opt", "opt-350m-like", "gpt2"]
PROMPT_LENS = [3, 17, 40, 64]
NEW_TOKENS = 12
LOGPROB_TOL = 1e-4  # float32 on both sides; differences come from summation order only


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _engine_config(path: str, **cache: int) -> EngineConfig:
    return EngineConfig(
        model=path,
        dtype="float32",
        cache=CacheConfig(
            num_blocks=cache.get("num_blocks", 64), block_size=cache.get("block_size", 16)
        ),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=256),
    )


@pytest.fixture(scope="module", params=KINDS)
def hf_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, torch.nn.Module]:
    model = tiny_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    return str(path), model


def test_greedy_tokens_and_logprobs_match_hf(
    hf_dir: tuple[str, torch.nn.Module], make_engine
) -> None:
    path, hf = hf_dir
    loaded = load(resolve(path), dtype="float32")
    eng = make_engine(_engine_config(path), loaded)
    prompts = _prompts(loaded.config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    ids = [eng.add_request(p, params) for p in prompts]
    outs = {}
    while eng.has_unfinished():
        outs.update({o.request_id: o for o in eng.step() if o.finished})
    for rid, prompt in zip(ids, prompts, strict=True):
        ref_tokens, ref_logits = hf_greedy(hf, prompt, NEW_TOKENS)
        ours = outs[rid]
        assert ours.token_ids == ref_tokens, f"prompt of {len(prompt)} tokens diverged"
        ref_lp = ref_logits.log_softmax(-1)
        for step, lp in enumerate(ours.logprobs):
            assert lp.token_id == ref_tokens[step]
            assert abs(lp.logprob - ref_lp[step, lp.token_id].item()) < LOGPROB_TOL
            for tok, val in lp.top:
                assert abs(val - ref_lp[step, tok].item()) < LOGPROB_TOL


@pytest.mark.parametrize("block_size", [1, 4, 256])
def test_block_size_does_not_change_output(
    hf_dir: tuple[str, torch.nn.Module], block_size: int, make_engine
) -> None:
    """Paged decode equals contiguous-cache decode: block_size 256 holds every request in
    one contiguous block; 1 and 4 scatter it over many."""
    path, _ = hf_dir
    loaded = load(resolve(path), dtype="float32")
    prompts = _prompts(loaded.config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=3)

    def run(bs: int, num_blocks: int) -> list[tuple[list[int], list[float]]]:
        eng = make_engine(_engine_config(path, block_size=bs, num_blocks=num_blocks), loaded)
        ids = [eng.add_request(p, params) for p in prompts]
        done = {}
        while eng.has_unfinished():
            done.update({o.request_id: o for o in eng.step() if o.finished})
        return [(done[i].token_ids, [lp.logprob for lp in done[i].logprobs]) for i in ids]

    contiguous = run(256, 8)
    paged = run(block_size, 8 * 256 // block_size)
    for (tok_c, lp_c), (tok_p, lp_p) in zip(contiguous, paged, strict=True):
        assert tok_c == tok_p
        assert max(abs(a - b) for a, b in zip(lp_c, lp_p, strict=True)) < LOGPROB_TOL
