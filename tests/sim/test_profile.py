"""The bundled A100 profiles reproduce the paper's worked values."""

from __future__ import annotations

import pytest

from distserve.sim.profile import Profile, bundled_a100, find, load_profiles, save_profiles


def test_worked_values_opt13b_tp1() -> None:
    p = find(bundled_a100("distserve"), "opt-13b", 1)
    assert p.prefill_time([512]) == pytest.approx(0.0721, abs=1e-4)
    assert p.prefill_time([512] * 4) == pytest.approx(0.234, abs=1e-3)
    assert p.decode_time([512] * 32) == pytest.approx(
        0.0315, abs=1e-4
    )  # context 513 incl. the new token
    assert p.kv_capacity_tokens == 66144


def test_both_engines_and_all_parallelisms_load() -> None:
    for engine in ("distserve", "vllm"):
        got = {(p.model, p.tp) for p in bundled_a100(engine)}
        assert got == {
            ("opt-13b", 1),
            ("opt-13b", 2),
            ("opt-13b", 4),
            ("opt-66b", 2),
            ("opt-66b", 3),
            ("opt-66b", 4),
            ("opt-66b", 8),
        }
    with pytest.raises(KeyError, match="opt-175b"):
        find(bundled_a100(), "opt-175b", 1)


def test_large_batch_triple_from_threshold() -> None:
    p = Profile(
        "m", "hw", decode_small=(1.0, 0.0, 0.0), decode_large=(2.0, 0.0, 0.0), decode_threshold=3
    )
    assert (
        p.decode_time([1, 1]) == 1.0
        and p.decode_time([1, 1, 1]) == 2.0
        and p.decode_time([]) == 0.0
    )


def test_round_trip(tmp_path) -> None:
    profiles = bundled_a100()
    path = tmp_path / "p.json"
    save_profiles(str(path), profiles)
    assert load_profiles(str(path)) == profiles


def test_profiler_on_a_real_tiny_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The profiler runs the real runner over its (quick) grid and fits a profile that
    records the worker's kernel limit; where the limit falls inside the grid, the decode
    threshold sits just above it and both sides of it were measured."""
    import sys

    from distserve.config import EngineConfig
    from distserve.core import CacheConfig, SchedulerConfig
    from distserve.planner.profile import profile_model
    from tests.model.hf_reference import tiny_hf_model

    tiny_hf_model("llama").save_pretrained(tmp_path)
    config = EngineConfig(
        model=str(tmp_path),
        dtype="bfloat16",
        cache=CacheConfig(num_blocks=512),
        scheduler=SchedulerConfig(max_num_batched_tokens=4096),
    )
    prof = profile_model(config, cores=1, quick=True, progress=False)
    rows = prof.fit["kernel_rows"]
    sizes = {b for b, _, _ in prof.fit["samples"]["decode"]}
    assert prof.prefill_time([64]) > 0 and prof.decode_time([64]) > 0
    assert prof.kv_capacity_tokens == 512 * 16
    if rows is not None and 0 < rows < 16 and rows != sys.maxsize:
        assert {rows, rows + 1} <= sizes
        assert prof.decode_threshold == rows + 1
