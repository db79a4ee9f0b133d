"""`distserve` as a user runs it: a real process, real model, flags checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs the CLI end to end in a subprocess


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


def test_plan_json_on_the_bundled_profiles() -> None:
    """`distserve plan` end to end: OPT-13B on 2 A100s, tensor parallelism only, the
    calibrated serving path recorded in the plan."""
    r = _run(
        "plan", "--profile", "a100", "--model", "opt-13b", "--devices-per-node", "2",
        "--dataset", "random", "--num-requests", "60", "--ttft-slo", "0.25", "--tpot-slo", "0.1",
        "--max-pp", "1", "--compute-scale", "1.1", "--decode-scale", "1.3", "--workers", "1",
        "--decode-seq-time", "0.001",
        "--baseline-serving-path",
        '{"compute_scale": 1.2, "step_overhead": 0.002, "decode_seq_time": 0}',
        "--chunked-serving-path", '{"compute_scale": 1.4}', "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    shapes = [
        c[k]
        for c in (plan["disagg"], *plan["baselines"].values())
        if c
        for k in ("prefill", "decode", "colocated")
        if c.get(k)
    ]
    assert shapes and all(s["pp"] == 1 for s in shapes)
    assert plan["serving_path"]["compute_scale"] == 1.1
    assert plan["serving_path"]["decode_scale"] == 1.3
    base = plan["serving_path"]["baselines"]  # its own keys, the rest from the flags
    assert (base["compute_scale"], base["step_overhead"], base["decode_scale"]) == (1.2, 0.002, 1.3)
    assert plan["serving_path"]["decode_seq_time"] == 0.001 and base["decode_seq_time"] == 0
    assert plan["serving_path"]["chunked"]["compute_scale"] == 1.4
    assert plan["recommended"] in ("disagg", "colocated", "chunked")


def test_plan_bad_flags_name_the_flag() -> None:
    base = ["plan", "--profile", "a100", "--devices-per-node", "2"]
    for args, flag in (
        (["--decode-scale", "0"], "--decode-scale"),
        (["--max-pp", "0"], "--max-pp"),
        (["--compute-scale", "-1"], "--compute-scale"),
        (["--decode-seq-time", "-0.001"], "--decode-seq-time"),
        (["--baseline-serving-path", '{"decode_seq_time": -1}'], "--baseline-serving-path"),
        (["--baseline-serving-path", '{"decode_seq_time": null}'], "--baseline-serving-path"),
        (["--baseline-serving-path", '{"compute_scale": 0}'], "--baseline-serving-path"),
        (["--baseline-serving-path", '{"speed": 2}'], "--baseline-serving-path"),
        (["--baseline-serving-path", "no-such-file.json"], "--baseline-serving-path"),
        (["--chunked-serving-path", '{"speed": 2}'], "--chunked-serving-path"),
    ):
        r = _run(*base, "--ttft-slo", "1", "--tpot-slo", "0.1", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert flag in r.stderr, r.stderr


def test_simulate_charges_the_per_request_decode_time(tmp_path) -> None:
    """`distserve simulate` end to end, with and without --decode-seq-time: the same
    requests, and each decode step of b requests longer by (b - 1) x the flag."""
    out = {}
    for seq in ("0", "0.01"):
        path = tmp_path / f"sim-{seq}.json"
        r = _run(
            "simulate", "--profile", "a100", "--profile-model", "opt-13b", "--mode", "colocated",
            "--instances", "1", "--dataset", "random", "--num-requests", "40", "--rate", "20",
            "--ttft-slo", "5", "--tpot-slo", "0.2", "--decode-seq-time", seq,
            "--output", str(path),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        out[seq] = json.loads(path.read_text())["summary"]
    assert out["0.01"]["tpot"]["p50"] > out["0"]["tpot"]["p50"] + 0.01
    r = _run("simulate", "--profile", "a100", "--decode-seq-time", "-1", "--ttft-slo", "1",
             "--tpot-slo", "1")  # fmt: skip
    assert r.returncode == 2 and "--decode-seq-time" in r.stderr


@pytest.mark.slow  # Ray workers loading the real model
def test_profile_a_tensor_parallel_instance(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`profile --tp 3`: SmolLM2's heads split 3 ways over the cores given, as serve runs
    it; a tp the heads do not divide is refused naming the flag and the head counts."""
    r = _run("profile", "--model", "smollm2-135m", "--tp", "2", "--output", str(tmp_path / "x"))
    assert r.returncode == 2 and "--tp 2" in r.stderr and "9 attention heads" in r.stderr
    out = tmp_path / "tp3.json"
    # --max-model-len 256: prompts of 32 and 128 tokens only, the quick grid's cheap part
    r = _run(
        "profile", "--tp", "3", "--cores", "2", "--quick", "--no-progress",
        "--max-model-len", "256", "--output", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    prof = json.loads(out.read_text())["profiles"][0]
    assert (prof["tp"], prof["pp"], prof["cores"]) == (3, 1, 2)
    # the fitted formulas, not one coefficient: with prompts of 32-128 tokens only, the
    # non-negative fit may put a prompt's whole cost in the quadratic term (b = 0)
    a, b, c = prof["prefill"]
    assert a + b * 128 + c * 128**2 > a + b * 32 + c * 32**2 > 0
    a, b, c = prof["decode_small"]
    assert a + b * 33 + c > 0
    assert all(t > 0 for _, t in prof["fit"]["samples"]["prefill"])
