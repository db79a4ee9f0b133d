"""The bundled SmolLM2-135M-Instruct against HF transformers reading the same GGUF file
with its own loader (dequantization, q/k un-permutation) and its own tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

from distserve.config import EngineConfig
from distserve.core import CacheConfig, SamplingParams, SchedulerConfig
from distserve.model.loader import load
from distserve.model.registry import resolve

pytestmark = pytest.mark.slow  # loads the real model

PROMPTS = [
    "The capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "woodcutter and his three daughters. Every morning he would",
    "Q: What is 12 times 7?\nA:",
]
NEW_TOKENS = 16
LOGPROB_TOL = 2e-4  # float32, 30 layers; measured <= 3e-5 (summation order only)

TEXTS = [
    "Hello world 12345, it's 3.14!  x",
    "<|im_start|>user\nWhat's up?<|im_end|>\n",
    "naïve café — 東京 🚀 tabs\tand\nnewlines   end",
    "    indented code():\n\treturn [1,2,3]",
    "",
]


@pytest.fixture(scope="module")
def hf_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve("smollm2-135m").path
    assert path is not None
    d, f = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def ours_fp32():
    return load(resolve("smollm2-135m"), dtype="float32")


def test_tokenizer_matches_hf(hf_gguf, ours_fp32) -> None:
    hf_tok, _ = hf_gguf
    ours = ours_fp32.tokenizer
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.eos_token_id == hf_tok.eos_token_id == 2


def test_chat_template_matches_hf(hf_gguf, ours_fp32) -> None:
    hf_tok, _ = hf_gguf
    for messages in (
        [{"role": "user", "content": "Hi there"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"},
        ],
    ):
        ours = ours_fp32.tokenizer.apply_chat_template(messages)
        assert ours == hf_tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


def test_batched_greedy_matches_hf(hf_gguf, ours_fp32, make_engine) -> None:
    hf_tok, hf = hf_gguf
    eng = make_engine(
        EngineConfig(
            dtype="float32",
            cache=CacheConfig(num_blocks=128),
            scheduler=SchedulerConfig(max_num_seqs=8),
        ),
        ours_fp32,
    )
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    ids = [eng.add_request(p, params) for p in PROMPTS]
    done = {}
    while eng.has_unfinished():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    for rid, prompt in zip(ids, PROMPTS, strict=True):
        enc = hf_tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = hf.generate(
                **enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                output_logits=True, return_dict_in_generate=True, pad_token_id=2,
            )  # fmt: skip
        ref = out.sequences[0, enc.input_ids.shape[1] :].tolist()
        assert done[rid].token_ids == ref, prompt
        ref_lp = torch.cat(out.logits).float().log_softmax(-1)
        worst = max(
            abs(v - ref_lp[i, t].item())
            for i, lp in enumerate(done[rid].logprobs)
            for t, v in lp.top
        )
        assert worst < LOGPROB_TOL, f"log-prob error {worst:.2e} for {prompt!r}"
