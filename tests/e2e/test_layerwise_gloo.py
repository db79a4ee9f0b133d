"""Layer-wise KV transfer between two processes over gloo (benchmarks/layerwise_transfer.py,
runtime/worker/layerwise.py): what the receiver holds equals the prefill's KV bit for bit,
sent layer by layer and after the forward alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow  # two processes load SmolLM2
def test_layerwise_over_gloo_delivers_the_prefills_kv(tmp_path) -> None:
    out = tmp_path / "lw.json"
    cmd = [sys.executable, "benchmarks/layerwise_transfer.py", "--lengths", "40", "--rounds",
           "1", "--output", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=300)
    trials = json.loads(out.read_text())["trials"]
    assert sorted(t["mode"] for t in trials) == ["after", "layerwise"]
    assert all(t["equal"] for t in trials)
