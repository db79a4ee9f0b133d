"""Profiler (fits a latency profile from the real runner) and placement search. Never
imports torch at module level: the search runs where torch is absent."""
