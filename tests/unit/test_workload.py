"""Dataset preparation, arrivals and workload building (no model: a word tokenizer)."""

from __future__ import annotations

import json
import statistics

import pytest

from distserve.workload import datasets
from distserve.workload.arrivals import arrival_times
from distserve.workload.build import WorkloadSpec, build_workload
from distserve.workload.sharegpt import iter_conversations, sharegpt_path
from distserve.workload.spec import Workload


class WordTokenizer:
    """One token per whitespace-separated word: lengths are easy to compute by hand."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [len(w) for w in text.split()]


def _conv(*turns: str) -> dict:
    return {
        "id": "x",
        "conversations": [
            {"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)
        ],
    }


def _write_cut_file(
    path,
    convs: list[dict],
    tail: str = '{"id": "cut", "conversations": [{"from": "human", "value": "half a str',
) -> None:
    body = ",\n".join(json.dumps(c) for c in convs)
    path.write_text("[\n" + body + ",\n" + tail)


def test_parser_returns_complete_objects_and_stops_at_the_cut(tmp_path) -> None:
    f = tmp_path / "cut.json"
    convs = [_conv("a " * i, "b", "c") for i in range(1, 50)]
    _write_cut_file(f, convs)
    got = list(iter_conversations(str(f)))
    assert got == convs


def test_parser_reads_a_whole_array(tmp_path) -> None:
    f = tmp_path / "whole.json"
    f.write_text(json.dumps([_conv("x", "y", "z")] * 3))
    assert len(list(iter_conversations(str(f)))) == 3


def test_real_sharegpt_file_has_17671_complete_conversations() -> None:
    assert sum(1 for _ in iter_conversations(sharegpt_path())) == 17671


def test_chatbot_filters_and_is_deterministic(tmp_path) -> None:
    f = tmp_path / "sg.json"
    convs = [_conv("hi there", "hello")]  # 2 turns: dropped
    convs += [_conv("one two", "three four five", "six", "seven eight") for _ in range(30)]
    convs += [_conv("w " * 3000, "x", "y")]  # prompt + output >= 2048 tokens whatever the split
    _write_cut_file(f, convs)
    samples, info = datasets.chatbot(WordTokenizer(), seed=1, path=str(f))
    assert info["conversations_read"] == len(convs)
    assert len(samples) == 30
    for prompt, out in samples:
        assert len(prompt) + out < 2048 and out >= 1
        # the prompt is a prefix of the turns (in words), the output the next turn
        assert (len(prompt), out) in {(2, 3), (5, 1), (6, 2)}
    again, _ = datasets.chatbot(WordTokenizer(), seed=1, path=str(f))
    other, _ = datasets.chatbot(WordTokenizer(), seed=2, path=str(f))
    assert again == samples and other != samples


def test_code_is_humaneval() -> None:
    samples, info = datasets.code(WordTokenizer())
    assert len(samples) == 164 and info["samples"] == 164
    assert all(len(p) > 0 and o >= 1 for p, o in samples)


def test_summarization_lengths(tmp_path) -> None:
    f = tmp_path / "sg.json"
    _write_cut_file(f, [_conv("q", "answer " * 120, "q2", "more words " * 90) for _ in range(20)])
    samples, _ = datasets.summarization(WordTokenizer(), seed=3, count=25, path=str(f))
    assert len(samples) == 25
    assert all(1900 <= len(p) <= 2040 and 1 <= o <= 256 for p, o in samples)
    assert all(o >= 64 or len(p) + o == 2047 for p, o in samples)  # cut only to fit
    assert all(len(p) + o < 2048 for p, o in samples)


def test_arrivals_poisson_and_gamma_statistics() -> None:
    t = arrival_times(20000, rate=4.0, cv=1.0, seed=0)
    gaps = [b - a for a, b in zip(t, t[1:], strict=False)]
    assert t[0] == 0.0 and t == sorted(t)
    assert abs(statistics.mean(gaps) - 0.25) < 0.01
    assert abs(statistics.stdev(gaps) / statistics.mean(gaps) - 1.0) < 0.05
    bursty = arrival_times(20000, rate=4.0, cv=3.0, seed=0)
    g2 = [b - a for a, b in zip(bursty, bursty[1:], strict=False)]
    assert abs(statistics.mean(g2) - 0.25) < 0.02
    assert abs(statistics.stdev(g2) / statistics.mean(g2) - 3.0) < 0.3
    assert arrival_times(5, rate=float("inf")) == [0.0] * 5
    with pytest.raises(ValueError, match="rate"):
        arrival_times(5, rate=0)


def test_build_workload_caps_and_determinism(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DISTSERVE_CACHE", str(tmp_path))
    spec = WorkloadSpec(
        dataset="random",
        num_requests=50,
        rate=2.0,
        seed=7,
        prompt_len=(10, 400),
        output_len=(5, 300),
        max_prompt_len=200,
        max_output_len=100,
    )
    a = build_workload(spec, WordTokenizer())
    b = build_workload(spec, WordTokenizer())
    assert a.to_json() == b.to_json()
    assert all(r.prompt_len <= 200 and r.output_len <= 100 for r in a.requests)
    assert a.meta["spec"]["max_prompt_len"] == 200 and a.meta["spec"]["max_output_len"] == 100
    assert Workload.from_json(a.to_json()).requests == a.requests
    fixed = build_workload(
        WorkloadSpec(dataset="fixed", num_requests=5, prompt_len=(64, 64), output_len=(8, 8)),
        WordTokenizer(),
    )
    assert {(r.prompt_len, r.output_len) for r in fixed.requests} == {(64, 8)}


def test_trace_replay(tmp_path) -> None:
    f = tmp_path / "t.csv"
    f.write_text("timestamp,prompt_len,output_len\n10.5,20,3\n10.0,5,7\n12.0,9,1\n")
    wl = build_workload(
        WorkloadSpec(dataset="trace", trace_path=str(f), num_requests=10), WordTokenizer()
    )
    assert [(r.arrival, r.prompt_len, r.output_len) for r in wl.requests] == [
        (0.0, 5, 7),
        (0.5, 20, 3),
        (2.0, 9, 1),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("time,p,o\n1,2,3\n")
    with pytest.raises(ValueError, match="header"):
        build_workload(WorkloadSpec(dataset="trace", trace_path=str(bad)), WordTokenizer())


def test_spec_validation_names_the_field() -> None:
    for kwargs, field in (
        ({"dataset": "nope"}, "dataset"),
        ({"rate": 0}, "rate"),
        ({"num_requests": 0}, "num_requests"),
        ({"burstiness": -1}, "burstiness"),
        ({"prompt_len": (5, 2)}, "prompt_len"),
        ({"dataset": "trace"}, "trace"),
    ):
        with pytest.raises(ValueError, match=field):
            WorkloadSpec(**kwargs)
