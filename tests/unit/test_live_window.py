"""The live window (cluster/live.py) that adaptive re-planning replays (issue 23): under
overload most of what arrived has not finished, and the kinds that wait longest (long
prompts) finish least, so the window's workload is what arrived, finished or not, plus
the backlog still queued from before it; not only what finished."""

from __future__ import annotations

from distserve.cluster.live import Finished, LiveWindow
from distserve.core import Request, SamplingParams

NOW = 100.0
"""The window (20 s) spans [80, 100]."""


def arrive(live: LiveWindow, rid: str, t: float, plen: int, max_tokens: int) -> Request:
    req = Request(rid, [7] * plen, SamplingParams(max_tokens=max_tokens, ignore_eos=True), t)
    live.on_arrival(t, req)
    return req


def finish(live: LiveWindow, req: Request, output_len: int, t: float) -> None:
    live.on_finished(
        Finished(req.arrival_time, tuple(req.prompt_token_ids), output_len, 0.1, 0.01), t
    )
    live.forget(req.request_id)


def test_a_window_under_overload_replays_what_arrived_not_only_what_finished() -> None:
    live = LiveWindow(20.0)
    backlog = arrive(live, "backlog", 50.0, 1700, 150)  # queued since before the window
    for i in range(10):  # short prompts at 1 req/s: all finished, 40 tokens each
        req = arrive(live, f"s{i}", 80.5 + i, 100, 64)
        finish(live, req, 40, 81.0 + i)
    longs = [arrive(live, f"l{i}", 90.0 + 0.25 * i, 1800, 150) for i in range(40)]
    for req in longs[:2]:  # 4 req/s of long prompts: 2 of 40 finished
        finish(live, req, 100, 95.0)
    longs[2].output_token_ids.extend([7] * 120)  # running: 120 tokens out so far
    arrive(live, "medium", 99.9, 600, 77)  # no finished request of its kind

    wl = live.workload(NOW)
    assert len(wl) == 10 + 40 + 1 + 1  # the old window: the 12 finished
    reqs = sorted(wl.requests, key=lambda r: r.arrival)
    # the backlog as arriving at the window's start, then the window's own arrivals
    assert reqs[0].arrival == 0.0 and reqs[0].prompt_len == 1700
    assert abs(reqs[-1].arrival - 19.9) < 1e-9 and reqs[-1].prompt_len == 600
    assert sum(r.prompt_len >= 1500 for r in reqs) == 41  # the long mix is seen
    by_len: dict[int, list[int]] = {}
    for r in reqs:
        by_len.setdefault(r.prompt_len, []).append(r.output_len)
    assert by_len[100] == [40] * 10  # finished: their real lengths
    # unfinished: the mean of finished requests of their kind (prompts within 2x), at
    # least what they generated; with none of their kind, their max_tokens
    assert sorted(by_len[1800]) == [100] * 39 + [120]
    assert by_len[1700] == [100] and by_len[600] == [77]
    # the latest `limit` only, and an ended request is no longer replayed
    assert len(live.workload(NOW, limit=30)) == 30
    live.forget(backlog.request_id)
    assert len(live.workload(NOW)) == 51
