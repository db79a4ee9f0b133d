"""`--dtype auto` (the default): bfloat16 only where bf16 matmuls are native."""

from __future__ import annotations

from pathlib import Path

import pytest

from distserve.config import EngineConfig, cpu_has_fast_bf16, resolve_dtype

ZEN3 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512vl avx512_bf16\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: avx2 avx512f amx_tile amx_bf16\n"
SKYLAKE_X = "processor\t: 0\nflags\t\t: avx2 avx512f avx512bw avx512vl\n"


@pytest.mark.parametrize(
    ("cpuinfo", "fast"),
    [(ZEN3, False), (ZEN4, True), (SAPPHIRE_RAPIDS, True), (SKYLAKE_X, False)],
)
def test_fast_bf16_is_read_from_the_cpu_flags(tmp_path: Path, cpuinfo: str, fast: bool) -> None:
    f = tmp_path / "cpuinfo"
    f.write_text(cpuinfo)
    assert cpu_has_fast_bf16(str(f)) is fast


def test_no_cpuinfo_means_no_fast_bf16(tmp_path: Path) -> None:
    assert cpu_has_fast_bf16(str(tmp_path / "absent")) is False


def test_auto_resolves_by_device_and_an_explicit_dtype_stays() -> None:
    assert resolve_dtype("auto", "cuda:0") == "bfloat16"
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if cpu_has_fast_bf16() else "float32")
    for dtype in ("bfloat16", "float16", "float32"):
        assert resolve_dtype(dtype, "cpu") == dtype


def test_the_engine_config_holds_a_concrete_dtype() -> None:
    assert EngineConfig().dtype == resolve_dtype("auto", "cpu")
    assert EngineConfig(dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        EngineConfig(dtype="int8")
