"""`distserve plan --affinity low` (Algorithm 2) as a user runs it: decode segments run
on the `--profile-decode` profiles, prefill segments on `--profile`'s."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs the CLI end to end in a subprocess


def test_low_affinity_plan_honours_profile_decode() -> None:
    r = subprocess.run(
        [
            sys.executable, "-m", "distserve.cli", "plan", "--profile", "a100",
            "--profile-decode", "a100-vllm", "--affinity", "low", "--model", "opt-13b",
            "--num-nodes", "2", "--devices-per-node", "2", "--max-pp", "1",
            "--dataset", "random", "--num-requests", "60", "--ttft-slo", "0.25",
            "--tpot-slo", "0.1", "--workers", "1", "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["affinity"] == "low"
    disagg = plan["disagg"]
    assert disagg is not None, plan["phase_goodputs"]["search"]
    assert "distserve engine" in disagg["prefill"]["profile"]["source"]
    assert "vllm engine" in disagg["decode"]["profile"]["source"]
    # a unit's prefill and decode segment share a node of 2 GPUs: tp1 + tp1
    assert (disagg["prefill"]["tp"], disagg["decode"]["tp"]) == (1, 1)
    # every unit searched pairs a distserve prefill with a vllm decode of the same pp
    assert plan["phase_goodputs"]["search"], "units were scored"
