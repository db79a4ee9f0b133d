"""The 429's Retry-After comes from how fast prompts have been leaving the queues."""

from __future__ import annotations

from distserve.cluster.drain import MAX_RETRY, UNKNOWN_RETRY, DrainRate


def test_retry_after_follows_the_recent_rate() -> None:
    d = DrainRate(window=30.0)
    assert d.retry_after(5, now=0.0) == UNKNOWN_RETRY  # nothing has left the queues yet
    for i in range(20):
        d.record(i * 0.5)  # 2 prompts a second over 10 s
    assert d.retry_after(1, now=10.0) == 1
    assert d.retry_after(40, now=10.0) == 20  # 40 prompts at ~2/s
    assert d.retry_after(10**6, now=10.0) == MAX_RETRY


def test_old_first_tokens_leave_the_window() -> None:
    d = DrainRate(window=30.0)
    for i in range(10):
        d.record(float(i))
    assert d.retry_after(10, now=100.0) == UNKNOWN_RETRY
