"""The multi-turn workload (`--dataset conversations`): sessions built from ShareGPT-shaped
conversations, each turn's prompt a token-exact prefix of the next (with the real
SmolLM2 tokenizer and chat template), seeded think times, Poisson session starts; the
bench summary's split of first and later turns. The client's closed loop against a real
server is tested in tests/e2e/test_conversations_bench.py."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from distserve.cli import build_parser
from distserve.cli.common import workload_spec
from distserve.metrics.results import RequestResult
from distserve.metrics.summary import summarize
from distserve.workload.arrivals import arrival_times
from distserve.workload.build import WorkloadSpec, build_workload
from distserve.workload.conversations import exchanges, session_turns, think_times
from distserve.workload.spec import Workload


class WordChat:
    """One token per word; a chat template of words: lengths easy to count by hand."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [len(w) for w in text.split()]

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        text = "".join(f" <{m['role']}> {m['content']} </> " for m in messages)
        return text + (" <assistant> " if add_generation_prompt else "")


def _conv(*turns: str) -> dict:
    return {
        "id": "x",
        "conversations": [
            {"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)
        ],
    }


def _file(tmp_path, convs: list[dict]) -> str:
    f = tmp_path / "sg.json"
    f.write_text(json.dumps(convs))
    return str(f)


@pytest.fixture(scope="module")
def smollm2():
    from distserve.model.metadata import tokenizer_for

    return tokenizer_for("smollm2-135m")


# Boundaries where re-tokenizing the whole text merges tokens across messages: an answer
# that starts with a newline or ends with spaces, a user turn that starts with one.
TRICKY = [
    ("Write a haiku about rain.", "\n\nSoft rain on the roof  "),
    ("\nNow one about snow!", "  White snow falls.\n"),
    ("And a third, in French?", "La pluie tombe... 123"),
    ("Thanks", "You're welcome."),
]


def test_each_turn_is_a_token_exact_prefix_of_the_next(smollm2) -> None:
    turns = session_turns(smollm2, TRICKY, max_turns=8)
    assert len(turns) == len(TRICKY)
    messages: list[dict] = []
    for k, (prompt, out) in enumerate(turns):
        user, answer = TRICKY[k]
        messages.append({"role": "user", "content": user})
        # the template's text, exactly, and the dataset answer's length as the output
        assert smollm2.decode(list(prompt), skip_special_tokens=False) == (
            smollm2.apply_chat_template(messages)
        )
        assert out == len(smollm2.encode(answer, add_special_tokens=False))
        messages.append({"role": "assistant", "content": answer})
        if k + 1 < len(turns):
            nxt = turns[k + 1][0]
            assert nxt[: len(prompt)] == prompt  # a true prefix: the cache can serve it
            rest = smollm2.decode(list(nxt[len(prompt) :]), skip_special_tokens=False)
            assert rest.startswith(answer + "<|im_end|>")  # then the answer as the data has it
    # re-tokenizing the whole text would not give a prefix here (what the test guards)
    naive = [smollm2.encode(smollm2.apply_chat_template(messages[: 2 * k + 1])) for k in range(4)]
    assert any(naive[k + 1][: len(naive[k])] != naive[k] for k in range(3))


def test_session_caps_turns_prompt_and_context() -> None:
    tok = WordChat()
    pairs = [("a b c", "d e"), ("f g", "h i j k"), ("l", "m n o"), ("p", "q")]
    full = session_turns(tok, pairs, max_turns=8)
    # turn k's prompt: 3 words per message wrapper + content, plus " <assistant> "
    assert [len(p) for p, _ in full] == [6, 6 + 4 + 4, 14 + 6 + 3, 23 + 5 + 3]
    assert [o for _, o in full] == [2, 4, 3, 1]
    assert session_turns(tok, pairs, max_turns=2) == full[:2]
    assert session_turns(tok, pairs, 8, max_prompt_len=23) == full[:3]  # ends, never cuts
    assert [o for _, o in session_turns(tok, pairs, 8, max_output_len=2)] == [2, 2, 2, 1]
    assert session_turns(tok, pairs, 8, context=23 + 3) == full[:2]  # prompt + output < context


def test_exchanges_stop_at_a_break_in_the_alternation() -> None:
    assert exchanges(_conv("u1", "a1", "u2", "a2", "u3")) == [("u1", "a1"), ("u2", "a2")]
    broken = _conv("u1", "a1", "u2", "a2")
    broken["conversations"][2]["from"] = "gpt"
    assert exchanges(broken) == [("u1", "a1")]
    assert exchanges(_conv("u1", "a1", " ", "a2")) == [("u1", "a1")]


def _spec(**kw) -> WorkloadSpec:
    return WorkloadSpec(**({"dataset": "conversations", "num_requests": 40, "rate": 2.0} | kw))


def _convs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        _conv(*(" ".join(f"w{i}" for _ in range(rng.randint(1, 30))) for _ in range(6)))
        for i in range(n)
    ] + [_conv("only", "one exchange")]  # never a session: fewer than 2 exchanges


def test_sessions_replay_conversations_with_seeded_think_times(tmp_path) -> None:
    from distserve.workload.conversations import build_sessions

    path = _file(tmp_path, _convs(60))
    wl = build_sessions(_spec(think_time=3.0), WordChat(), path)
    assert wl.meta["dataset"]["sessions"] == 40 and len(wl) == wl.meta["dataset"]["turns"]
    arrivals = [r.arrival for r in wl.requests]
    assert arrivals == sorted(arrivals) and [r.index for r in wl.requests] == list(range(len(wl)))
    sessions: dict[int, list] = {}
    for r in wl.requests:
        sessions.setdefault(r.session, []).append(r)
    assert sorted(sessions) == list(range(40))
    starts = []
    for turns in sessions.values():
        assert [r.turn for r in turns] == list(range(len(turns))) and 2 <= len(turns) <= 3
        assert turns[0].think_time == 0 and all(r.think_time > 0 for r in turns[1:])
        starts.append(turns[0].arrival)
        for a, b in zip(turns, turns[1:], strict=False):
            assert b.prompt_token_ids[: a.prompt_len] == a.prompt_token_ids
            assert b.arrival == pytest.approx(a.arrival + b.think_time)  # nominal arrival
    # sessions start as the seeded arrival process (Poisson at the rate)
    assert starts == pytest.approx(arrival_times(40, 2.0, 1.0, seed=0 + 2))
    # the same seed gives the same workload; another seed other think times and starts
    again = build_sessions(_spec(think_time=3.0), WordChat(), path)
    assert again.requests == wl.requests
    other = build_sessions(_spec(think_time=3.0, seed=1), WordChat(), path)
    assert [r.think_time for r in other.requests] != [r.think_time for r in wl.requests]
    still = build_sessions(_spec(think_time=0.0), WordChat(), path)
    assert all(r.think_time == 0 for r in still.requests)
    # the session fields survive the workload file
    assert Workload.from_json(wl.to_json()).requests == wl.requests


def test_think_times_are_exponential_with_the_mean() -> None:
    xs = think_times(20000, 2.0, random.Random(5))
    assert xs == think_times(20000, 2.0, random.Random(5))
    assert statistics.fmean(xs) == pytest.approx(2.0, rel=0.05)
    assert statistics.stdev(xs) == pytest.approx(2.0, rel=0.05)  # cv 1: exponential


def test_session_starts_are_poisson(tmp_path) -> None:
    from distserve.workload.conversations import build_sessions

    path = _file(tmp_path, _convs(1200))
    wl = build_sessions(_spec(num_requests=1000, rate=4.0, max_turns=2), WordChat(), path)
    starts = sorted(r.arrival for r in wl.requests if r.turn == 0)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.1)
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.1)


def test_bad_conversation_workloads_are_clear_errors(tmp_path) -> None:
    from distserve.workload.conversations import build_sessions

    path = _file(tmp_path, _convs(5))
    with pytest.raises(ValueError, match="only 5 sessions.*--max-prompt-len"):
        build_sessions(_spec(num_requests=6), WordChat(), path)

    class Plain:
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [1]

    with pytest.raises(ValueError, match="chat template"):
        build_workload(_spec(), Plain())
    for kwargs in ({"max_turns": 0}, {"think_time": -1.0}, {"think_time": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            _spec(**kwargs)


def test_the_real_dataset_gives_multi_turn_sessions(smollm2) -> None:
    wl = build_workload(_spec(num_requests=5, max_prompt_len=1024), smollm2)
    assert wl.meta["dataset"]["sessions"] == 5 and len(wl) >= 10
    assert all(r.prompt_len <= 1024 and r.prompt_len + r.output_len < 2048 for r in wl.requests)


def _parse(*args: str):
    parser, _ = build_parser()
    return parser.parse_args(args)


def test_bench_and_simulate_flags_make_a_sessions_spec_and_the_planner_refuses_it() -> None:
    slo = ["--ttft-slo", "1", "--tpot-slo", "1"]
    args = _parse("bench", *slo, "--dataset", "conversations", "--max-turns", "3")
    spec = workload_spec(args, args.rate)
    assert (spec.dataset, spec.max_turns, spec.think_time) == ("conversations", 3, 1.0)
    args = _parse("goodput", *slo, "--rates", "1", "--dataset", "conversations")
    assert workload_spec(args, 1.0).dataset == "conversations"
    sim = _parse("simulate", "--profile", "a100", *slo, "--dataset", "conversations",
                 "--think-time", "2")  # fmt: skip
    assert workload_spec(sim, 1.0).think_time == 2.0
    plan = _parse("plan", "--profile", "a100", "--devices-per-node", "2", *slo, "--dataset",
                  "conversations")  # fmt: skip
    with pytest.raises(ValueError, match="planner's search does not model sessions"):
        workload_spec(plan, 1.0)
    with pytest.raises(SystemExit):
        _parse("bench", *slo, "--think-time", "-1")


def test_summary_splits_first_and_later_turns() -> None:
    def res(i: int, turn: int, ttft: float, prompt: int, cached: int) -> RequestResult:
        r = RequestResult(i, prompt, 4, 0.0, ttft=ttft, tpot=0.01, e2e=ttft + 0.03)
        r.session, r.turn, r.num_tokens, r.cached_tokens = i // 2, turn, 4, cached
        return r

    results = [res(0, 0, 1.0, 100, 0), res(1, 1, 0.2, 300, 96), res(2, 0, 3.0, 100, 16)]
    results.append(res(3, 1, 0.4, 500, 304))
    s = summarize(results, 10.0, 1.0, 5.0)
    first, later = s["turns"]["first"], s["turns"]["later"]
    assert (first["count"], later["count"]) == (2, 2)
    assert first["ttft"] == {"p50": 2.0, "p90": pytest.approx(2.8)}
    assert later["ttft"]["p50"] == pytest.approx(0.3) and later["prompt_mean"] == 400
    assert later["prefix_cache"]["hit_share"] == pytest.approx(400 / 800)
    assert s["prefix_cache"] == {"cached_tokens": 416, "prompt_tokens": 1000, "hit_share": 0.416}
    plain = summarize([RequestResult(0, 10, 4, 0.0, ttft=0.1, tpot=0.01, e2e=0.2)], 1, 1, 1)
    assert "turns" not in plain and "prefix_cache" not in plain
