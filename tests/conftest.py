"""Shared fixtures. Engines made through `make_engine` are checked at teardown: every
KV block must be free and the block manager intact (no test may leak a block)."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module", autouse=True)
def collect_garbage_after_the_module() -> Iterator[None]:
    """A full garbage collection after each module whose process has grown past 1 GiB. A
    stopped in-process controller keeps its workers' models (GiBs) in reference cycles until
    a full collection, which may not come for many modules: two xdist workers holding them
    (11 and 6 GiB) once pushed the machine into Ray's out-of-memory killer."""
    yield
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc: collect anyway
        rss = 2**30 + 1
    if rss > 2**30:
        gc.collect()


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
