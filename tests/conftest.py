"""Shared fixtures. Engines made through `make_engine` are checked at teardown: every
KV block must be free and the block manager intact (no test may leak a block)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def make_engine() -> Iterator[Callable[..., object]]:
    from distserve.runtime.engine import LLMEngine

    made: list[LLMEngine] = []

    def make(config: object, loaded: object = None) -> LLMEngine:
        eng = LLMEngine(config, loaded)  # type: ignore[arg-type]
        made.append(eng)
        return eng

    yield make
    for eng in made:
        blocks = eng.scheduler.blocks
        blocks.check_integrity()
        assert not eng.scheduler.has_unfinished(), "a test left requests in an engine"
        assert blocks.num_used_blocks == 0, f"{blocks.num_used_blocks} KV blocks leaked"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run only where a CUDA device is (CI has none; a lent GPU machine does)."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
