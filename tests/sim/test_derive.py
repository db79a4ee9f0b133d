"""Profiles derived by the paper's analytic scaling (Appendix A)."""

import pytest

from distserve.model.registry import ARCHITECTURES
from distserve.sim.derive import derive_all, derive_profile
from distserve.sim.profile import a100_kv_capacity, bundled_a100, find


def test_derived_profile_is_close_to_a_measured_one():
    # OPT-66B tp4 derived from the measured tp2 lands near the measured tp4 profile
    ps = bundled_a100()
    opt66 = ARCHITECTURES["opt-66b"]
    derived = derive_profile(find(ps, "opt-66b", 2), opt66, opt66, 4)
    measured = find(ps, "opt-66b", 4)
    for lens in ([512], [256] * 8, [1800]):
        assert derived.prefill_time(lens) == pytest.approx(measured.prefill_time(lens), rel=0.2)
    for ctx in ([512] * 32, [1024] * 8):
        assert derived.decode_time(ctx) == pytest.approx(measured.decode_time(ctx), rel=0.25)
    assert derived.source.startswith("derived")


def test_derive_scales_with_size_and_tp():
    ps = bundled_a100()
    got = {p.tp: p for p in derive_all(ps, "opt-175b", a100_kv_capacity())}
    assert sorted(got) == [1, 2, 3, 4, 6, 8]  # divisors of 96 heads up to 8
    assert all(p.model == "opt-175b" and "derived" in p.source for p in got.values())
    # more devices, less time per batch; a bigger model than 66B at the same tp is slower
    assert got[8].prefill_time([512]) < got[4].prefill_time([512]) < got[2].prefill_time([512])
    assert got[4].prefill_time([512]) > find(ps, "opt-66b", 4).prefill_time([512])
    assert got[8].kv_capacity_tokens == 59520  # the paper's capacity table (pp1)
    with pytest.raises(ValueError, match="divide"):
        derive_profile(
            find(ps, "opt-66b", 2), ARCHITECTURES["opt-66b"], ARCHITECTURES["opt-175b"], 5
        )


def test_bundled_names_load_the_paper_files():
    from distserve.sim.profile import load_profiles

    vllm, ours = load_profiles("a100-vllm"), load_profiles("a100")
    assert {p.model for p in vllm} == {p.model for p in ours} == {"opt-13b", "opt-66b"}
    assert all("vllm" in p.source for p in vllm)
    assert find(vllm, "opt-13b", 1).prefill != find(ours, "opt-13b", 1).prefill
