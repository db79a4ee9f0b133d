"""SamplingParams: validation names the offending field; normalization of `stop`."""

from __future__ import annotations

from typing import Any

import pytest

from distserve.core import SamplingParams
from distserve.core.sampling_params import MAX_LOGPROBS


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", 2.0),
        ("max_tokens", True),
        ("temperature", -1.0),
        ("temperature", 100.5),
        ("temperature", float("nan")),
        ("temperature", True),
        ("temperature", "0.5"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.1),
        ("top_p", False),
        ("top_k", -2),
        ("top_k", 1.0),
        ("top_k", True),
        ("seed", 1.5),
        ("seed", True),
        ("stop", ("ok", "")),
        ("stop", ""),
        ("stop", (3,)),
        ("stop_token_ids", (-1,)),
        ("stop_token_ids", (True,)),
        ("ignore_eos", 1),
        ("logprobs", MAX_LOGPROBS + 1),
        ("logprobs", -1),
        ("logprobs", True),
    ],
)
def test_invalid_value_raises_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        SamplingParams(**{field: value})


def test_defaults_and_boundaries_are_accepted() -> None:
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k) == (16, 1.0, 1.0, 0)
    assert p.stop == () and p.stop_token_ids == () and p.logprobs is None
    SamplingParams(
        max_tokens=1, temperature=0, top_p=1.0, top_k=-1, logprobs=0, seed=0, ignore_eos=True
    )
    SamplingParams(temperature=100.0, top_p=1e-9, top_k=1, logprobs=MAX_LOGPROBS)


def test_stop_string_becomes_a_one_element_tuple() -> None:
    assert SamplingParams(stop="x").stop == ("x",)  # type: ignore[arg-type]


def test_stop_sequences_become_tuples() -> None:
    p = SamplingParams(stop=["a", "bc"], stop_token_ids=[3, 4])  # type: ignore[arg-type]
    assert p.stop == ("a", "bc")
    assert p.stop_token_ids == (3, 4)
    assert isinstance(p.stop, tuple) and isinstance(p.stop_token_ids, tuple)


def test_params_are_frozen_and_hashable_despite_extra() -> None:
    p = SamplingParams(stop="x", extra={"tag": [1]})  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        p.max_tokens = 3  # type: ignore[misc]
    assert hash(p) == hash(SamplingParams(stop=("x",)))
    assert p == SamplingParams(stop=("x",))


@pytest.mark.parametrize(
    ("temperature", "greedy"), [(0, True), (0.0, True), (1e-6, False), (1.0, False)]
)
def test_greedy_means_temperature_zero(temperature: float, greedy: bool) -> None:
    assert SamplingParams(temperature=temperature).greedy is greedy


@pytest.mark.parametrize(("top_k", "effective"), [(-1, 0), (0, 0), (1, 1), (50, 50)])
def test_effective_top_k_maps_both_off_spellings_to_zero(top_k: int, effective: int) -> None:
    assert SamplingParams(top_k=top_k).effective_top_k == effective
