"""The worker's choice of up to how many rows it takes the packed kernels."""

from __future__ import annotations

import sys

import pytest

from distserve.model.packed import RowLimits
from distserve.runtime.worker.kernel_choice import choose_kernel_rows
from distserve.runtime.worker.synthetic import SyntheticPlans


@pytest.fixture(autouse=True)
def _no_env_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISTSERVE_PACKED_MAX_ROWS", raising=False)


class _Machine:
    """A step's cost on a made-up CPU: with the kernels `kernel(b)`, without `torch(b)`,
    as its model's row limits say; the clock advances by what each step costs
    (deterministic, no sleeping)."""

    def __init__(self, kernel, torch) -> None:  # type: ignore[no-untyped-def]
        self.kernel, self.torch, self.now, self.batches = kernel, torch, 0.0, []
        self.limits = RowLimits()

    def execute(self, plan) -> None:  # type: ignore[no-untyped-def]
        b = len(plan.chunks)
        self.batches.append(b)
        on = b <= self.limits.max_rows(None, None, False)  # type: ignore[arg-type]
        self.now += self.kernel(b) if on else self.torch(b)

    def clock(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "kernel,torch,expected",
    [
        (lambda b: 3.0 * b, lambda b: 13.5, 4),  # cross between 4 and 5: bisected
        (lambda b: 1.0 * b, lambda b: 6.5 + 0 * b, 6),
        (lambda b: 1.0, lambda b: 2.0, sys.maxsize),  # the kernels win at every size
        (lambda b: 2.0, lambda b: 1.0, 0),  # never
    ],
)
def test_the_limit_is_where_the_kernels_stop_winning(kernel, torch, expected) -> None:  # type: ignore[no-untyped-def]
    m = _Machine(kernel, torch)
    plans = SyntheticPlans(num_blocks=4096, block_size=16, vocab=1000)
    rows, timings = choose_kernel_rows(m.execute, plans, m.limits, reps=2, clock=m.clock)
    assert rows == expected
    assert m.limits.model_rows == expected  # set for the model
    for b, (on, off) in timings.items():
        assert (on, off) == (kernel(b), torch(b))
    assert plans.blocks.num_used_blocks == 0  # every probe's blocks released


def test_a_small_cache_stops_the_probes_at_its_room() -> None:
    m = _Machine(lambda b: 1.0, lambda b: 2.0)
    plans = SyntheticPlans(num_blocks=9 * 5, block_size=16, vocab=1000)  # room for 5 requests
    rows, timings = choose_kernel_rows(m.execute, plans, m.limits, reps=1, clock=m.clock)
    assert rows == 4 and max(timings) == 4 and max(m.batches) == 4


@pytest.mark.slow  # a worker's model steps through the compiled kernels
def test_a_worker_chooses_at_start_on_the_real_model_steps() -> None:
    """A bf16 worker on a CPU with the packed kernels measures its limit at start, and
    its layers then follow it; the env override still wins."""
    from distserve.config import EngineConfig
    from distserve.core import CacheConfig
    from distserve.model.config import ModelConfig
    from distserve.model.loader import load
    from distserve.model.registry import ModelSource
    from distserve.runtime.worker.worker import Worker

    cfg = ModelConfig(
        arch="llama", vocab_size=300, hidden_size=128, num_layers=2, num_heads=6,
        num_kv_heads=2, intermediate_size=200, max_position_embeddings=256, head_dim=64,
    )  # fmt: skip
    loaded = load(ModelSource("tiny", "random", None, cfg), "bfloat16")
    if not loaded.model.has_packed_kernels():
        pytest.skip("no packed bf16 kernels on this CPU")
    config = EngineConfig(model="tiny", dtype="bfloat16", cache=CacheConfig(num_blocks=1024))
    worker = Worker(config, loaded=loaded)
    rows = worker.info().kernel_rows
    assert rows is not None and rows >= 0
    lin = next(m for m in loaded.model.modules() if getattr(m, "packed", None) is not None)
    assert lin.packed.max_rows(lin.weight) == rows
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTSERVE_PACKED_MAX_ROWS", "3")
        assert lin.packed.max_rows(lin.weight) == 3
