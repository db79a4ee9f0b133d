"""`distserve` as a user runs it: a real process, real model, flags checked."""

from __future__ import annotations

import json
import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distserve.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_generate_json_two_prompts() -> None:
    r = _run(
        "generate",
        "--json",
        "--max-tokens",
        "6",
        "--kv-cache-gb",
        "0.1",
        "The capital of France is",
        "1, 2, 3,",
    )
    assert r.returncode == 0, r.stderr
    outs = json.loads(r.stdout)["outputs"]
    assert [o["prompt"] for o in outs] == ["The capital of France is", "1, 2, 3,"]
    assert all(len(o["token_ids"]) == 6 and isinstance(o["text"], str) for o in outs)
    assert "Paris" in outs[0]["text"]


def test_help_lists_every_flag_with_text() -> None:
    r = _run("generate", "--help")
    assert r.returncode == 0
    for flag in (
        "--model",
        "--max-tokens",
        "--temperature",
        "--json",
        "--top-p",
        "--seed",
        "--stop",
        "--chat",
    ):
        assert flag in r.stdout


def test_bad_flags_name_the_flag() -> None:
    for args, flag in (
        (["--max-tokens", "0"], "--max-tokens"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"),
        (["--model", "no-such-model"], "--model"),
    ):
        r = _run("generate", *args, "hi")
        assert r.returncode == 2, (args, r.stderr)
        assert flag in r.stderr, r.stderr
