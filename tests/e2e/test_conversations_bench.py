"""`distserve bench --dataset conversations` against a real server (1P1D, Ray actors,
prefix caching on): each session's turns go closed loop (a turn is sent only after the
previous answer finished), and later turns are served partly from the prefix cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distserve.bench.server_process import running_server

pytestmark = pytest.mark.slow  # starts a real server (Ray actors, the real model)


def test_sessions_go_closed_loop_and_later_turns_hit_the_cache(tmp_path) -> None:
    out = tmp_path / "r.json"
    with running_server("--mode", "disagg") as url:
        r = subprocess.run(
            [
                sys.executable, "-m", "distserve.cli", "bench", "--base-url", url,
                "--dataset", "conversations", "--num-requests", "3", "--rate", "4",
                "--max-turns", "3", "--think-time", "0.05", "--max-prompt-len", "384",
                "--max-output-len", "8", "--ttft-slo", "30", "--tpot-slo", "5",
                "--no-progress", "--output", str(out),
            ],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    s, reqs = data["summary"], data["requests"]
    assert s["errors"] == 0 and s["completed"] == len(reqs)
    sessions: dict[int, list[dict]] = {}
    for q in reqs:
        sessions.setdefault(q["session"], []).append(q)
    assert len(sessions) == 3
    later = 0
    for turns in sessions.values():
        turns.sort(key=lambda q: q["turn"])
        assert [q["turn"] for q in turns] == list(range(len(turns))) and len(turns) >= 2
        for a, b in zip(turns, turns[1:], strict=False):
            finished = a["sent"] + a["e2e"]
            assert b["arrival"] >= finished and b["sent"] >= finished  # closed loop
            assert b["cached_tokens"] > 0  # the earlier turn's prompt, from the cache
            assert b["cached_tokens"] <= a["prompt_len"] < b["prompt_len"]
            later += 1
    assert s["turns"]["first"]["count"] == 3 and s["turns"]["later"]["count"] == later
    assert s["turns"]["later"]["prefix_cache"]["hit_share"] > 0
    assert s["turns"]["later"]["ttft"]["p50"] is not None
