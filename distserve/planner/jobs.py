"""The scoring jobs of a plan: the goodput of one (shape, role) each, found by bisection
with the simulator. Jobs of several searches (Algorithm 1 and the baselines) share one
pool of worker processes; a job starts as soon as a worker is free, so a long job does not
hold the others back, and with the floors of its search as they stand then (prune.py)."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field

from distserve.planner.estimates import estimate
from distserve.planner.phases import InstanceConfig, Setting, placement_goodput
from distserve.planner.prune import PairFloors, ShapeFloors

Progress = Callable[[str], None] | None


@dataclass
class Batch:
    """The jobs of one search, on one setting. `floors` decide which jobs may stop early
    (None: every job is scored in full). `score` fills `goodputs` (0 for a job stopped or
    skipped) and `seconds` (when its last job ended, from the start of `score`)."""

    setting: Setting
    jobs: list[tuple[InstanceConfig, str]]
    floors: ShapeFloors | PairFloors | None = None
    goodputs: list[float] = field(default_factory=list)
    seconds: float = 0.0


@contextmanager
def worker_pool(workers: int) -> Iterator[Executor | None]:
    """Worker processes for `score`, or None to score in this process (one worker)."""
    if workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(workers) as pool:
        yield pool


def score(
    batches: Sequence[Batch],
    pool: Executor | None,
    workers: int,
    progress: Progress,
    finished: Callable[[int], None] | None = None,
) -> None:
    """Score every job of every batch, at most `workers` at a time. Each batch goes in
    order of its jobs' analytic estimate per device (likely winners first, so that its
    floors cut the rest short); batches take turns. `finished(k)` is called as soon as
    batch k's last job is done (its caller may then give the pool more work)."""
    t0 = time.perf_counter()
    guesses = [[estimate(inst, role, b.setting) for inst, role in b.jobs] for b in batches]
    queue = deque(_turns(batches, guesses))
    left = [len(b.jobs) for b in batches]
    for b in batches:
        b.goodputs = [0.0] * len(b.jobs)

    def one_less(k: int) -> None:
        left[k] -= 1
        if left[k] == 0 and finished is not None:
            finished(k)

    running: dict[Future[tuple[float, float]], tuple[int, int, float]] = {}
    while queue or running:
        while queue and len(running) < max(1, workers):
            k, i = queue.popleft()
            b = batches[k]
            floor = b.floors.floor(i) if b.floors else 0.0
            if floor == math.inf:
                _say(progress, b, i, "skipped (no layout with it can win)")
                one_less(k)
                continue
            args = (b.setting, *b.jobs[i], guesses[k][i], floor)
            if pool is None:
                _done(batches[k], i, floor, _score(args), guesses[k][i], t0, progress)
                one_less(k)
            else:
                running[pool.submit(_score, args)] = (k, i, floor)
        if running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in sorted(done, key=lambda f: running[f][:2]):
                k, i, floor = running.pop(f)
                _done(batches[k], i, floor, f.result(), guesses[k][i], t0, progress)
                one_less(k)


def _turns(batches: Sequence[Batch], guesses: list[list[float]]) -> Iterator[tuple[int, int]]:
    def likely_first(b: Batch, guess: list[float]) -> deque[int]:
        return deque(sorted(range(len(b.jobs)), key=lambda i: -guess[i] / b.jobs[i][0].devices))

    orders = [likely_first(b, g) for b, g in zip(batches, guesses, strict=True)]
    while any(orders):
        for k, order in enumerate(orders):
            if order:
                yield k, order.popleft()


def _done(
    b: Batch,
    i: int,
    floor: float,
    scored: tuple[float, float],
    guess: float,
    t0: float,
    progress: Progress,
) -> None:
    g, seconds = scored
    b.goodputs[i] = g
    b.seconds = time.perf_counter() - t0
    if b.floors:
        b.floors.record(i, g)
    what = (
        f"{g:.3f} req/s"
        if g > 0 or not floor
        else f"below {floor:.3f} req/s, stopped: too slow to be part of a better layout"
    )
    _say(progress, b, i, f"{what} (simulated in {seconds:.1f} s; rough estimate {guess:.3f})")


def _say(progress: Progress, b: Batch, i: int, what: str) -> None:
    if progress:
        inst, role = b.jobs[i]
        progress(f"{role} {inst.label}: {what}")


def _score(job: tuple[Setting, InstanceConfig, str, float, float]) -> tuple[float, float]:
    """(goodput, seconds it took) of one job."""
    setting, inst, role, guess, floor = job
    t0 = time.perf_counter()
    if role == "prefill":
        g = placement_goodput(setting, inst, None, only="ttft", guess=guess, floor=floor)
    elif role == "decode":
        g = placement_goodput(setting, None, inst, only="tpot", guess=guess, floor=floor)
    else:
        chunked = role == "chunked"
        g = placement_goodput(
            setting, None, None, colocated=inst, chunked=chunked, guess=guess, floor=floor
        )
    return g, time.perf_counter() - t0
