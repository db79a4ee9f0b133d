"""The serving-path flags of simulate and plan: one per ServingPath knob, each verb's
defaults kept, and the ServingPath built from them."""

from __future__ import annotations

import dataclasses

import pytest

from distserve.cli import build_parser
from distserve.cli.common import serving_path
from distserve.sim.serving_path import ServingPath

SLO = ["--ttft-slo", "1", "--tpot-slo", "0.1"]
VERBS = {
    "simulate": ["simulate", "--profile", "a100", *SLO],
    "plan": ["plan", "--profile", "a100", "--devices-per-node", "2", *SLO],
}


@pytest.mark.parametrize(
    "verb,default", [("simulate", ServingPath()), ("plan", ServingPath(transfer_bandwidth=1e10))]
)
def test_each_verb_builds_its_default_serving_path(verb: str, default: ServingPath) -> None:
    parser, _ = build_parser()
    assert serving_path(parser.parse_args(VERBS[verb]), parser) == default


@pytest.mark.parametrize("verb", VERBS)
def test_every_knob_is_a_flag(verb: str) -> None:
    path = ServingPath(0.004, 1.1, 1.2, 1.3, 1.4, 0.0015, 2.5e9, 0.005)
    flags = [
        arg
        for f in dataclasses.fields(ServingPath)
        for arg in ("--" + f.name.replace("_", "-"), str(getattr(path, f.name)))
    ]
    parser, _ = build_parser()
    assert serving_path(parser.parse_args([*VERBS[verb], *flags]), parser) == path
