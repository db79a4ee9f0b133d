"""Several Ray nodes on this machine (`ray.cluster_utils`, in a process of its own:
tests/e2e/multinode_run.py): instances land on the nodes that have room for them, KV
crosses nodes through the object store, workers on other nodes than the KV store's reach
it relayed (a killed decode worker's requests resume from it), and losing the decode
instance's whole node loses no request (the prefill instance serves end to end until a
new node takes the decode instance, then returns to its role)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow  # a three-node Ray cluster, the real model
def test_serving_across_nodes_and_losing_one() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "tests.e2e.multinode_run"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert len(set(out["placed_on"])) == 2  # one instance per one-CPU node
    assert out["relayed"] == [True, True]  # the store is on the head node, no worker is
    assert out["store_bytes_written"] > 0 and out["resumes"] >= 1 and out["equal_after_resume"]
    # no shared memory across nodes; the resumes pulled from the store through this process
    assert set(out["transports"]) == {"object-store", "store-relay"}
    assert out["equal_during_outage"] and out["equal_after"]
    assert out["covered"] == [["prefill-0", "colocated"], ["decode-0", "decode"]]
    assert "no live decode instance" in out["reason"]
    assert out["roles_after"] == ["prefill", "decode"]
    assert out["used_blocks"] == 0
