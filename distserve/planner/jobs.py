"""The scoring jobs of a plan: the goodput of one (shape, role) each, found by bisection
with the simulator. Jobs of several searches (Algorithm 1 and the baselines) share one
pool of worker processes; a job starts as soon as a worker is free, so a long job does not
hold the others back, and with the floors of its search as they stand then (prune.py)."""

from __future__ import annotations

import functools
import math
import multiprocessing
import pickle
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from distserve.planner.estimates import estimate
from distserve.planner.phases import InstanceConfig, Setting, placement_goodput
from distserve.planner.prune import PairFloors, ShapeFloors

Progress = Callable[[str], None] | None
T = TypeVar("T")


@dataclass
class Batch:
    """The jobs of one search, on one setting. `floors` decide which jobs may stop early
    (None: every job is scored in full). `score` fills `goodputs` (0 for a job stopped or
    skipped) and `seconds` (when its last job ended, from the start of `score`)."""

    setting: Setting
    jobs: list[tuple[InstanceConfig, str]]
    floors: ShapeFloors | PairFloors | None = None
    goodputs: list[float] = field(default_factory=list)
    at_least: set[int] = field(default_factory=set)
    """Jobs stopped at their ceiling: their goodput is a lower bound (prune.py)."""
    seconds: float = 0.0


@contextmanager
def worker_pool(workers: int) -> Iterator[Executor | None]:
    """Worker processes for `score`, or None to score in this process (one worker)."""
    if workers <= 1:
        yield None
        return
    with process_pool(workers) as pool:
        yield pool


def process_pool(workers: int) -> ProcessPoolExecutor:
    """`workers` processes forked from a clean server process, never from the caller: a
    fork of a process that holds native threads or extension state (torch, a server, a
    test run) segfaulted in the child's garbage collector."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["distserve.planner.jobs"])
    return SettingPool(workers, mp_context=ctx)


class SettingPool(ProcessPoolExecutor):
    """A process pool that pickles each `Setting` (its workload: 4,000 prompts, ~9 MB) once,
    not once per job, and that a worker unpickles once: a job's Setting arguments, also
    inside a tuple argument, travel as `_Shipped`, which a worker turns back into its
    one copy. Pickling it per job took ~0.2 s of a plan's two cores, for each of ~60
    jobs; and one copy keeps the prompts' block names (sim/simulator.py) across jobs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shipped: dict[int, tuple[Setting, _Shipped]] = {}

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return super().submit(fn, *(self._ship(a) for a in args), **kwargs)

    def _ship(self, arg: Any) -> Any:
        if type(arg) is tuple:
            return tuple(self._ship(a) for a in arg)
        if not isinstance(arg, Setting):
            return arg
        kept = self._shipped.get(id(arg))  # holds `arg`: its id is not reused meanwhile
        if kept is None:
            blob = pickle.dumps(arg, pickle.HIGHEST_PROTOCOL)
            kept = self._shipped[id(arg)] = (arg, _Shipped(uuid.uuid4().hex, blob))
        return kept[1]


@dataclass(frozen=True)
class _Shipped:
    """A pickled Setting that unpickles as the worker's one copy of it."""

    key: str
    blob: bytes

    def __reduce__(self) -> tuple[Any, ...]:
        return _received, (self.key, self.blob)


_RECEIVED: dict[str, Setting] = {}
"""In a worker: the Settings received so far (a pool's workers end with it)."""


def _received(key: str, blob: bytes) -> Setting:
    setting = _RECEIVED.get(key)
    if setting is None:
        setting = _RECEIVED[key] = pickle.loads(blob)
    return setting


def score(
    batches: Sequence[Batch],
    pool: Executor | None,
    workers: int,
    progress: Progress,
    finished: Callable[[int], None] | None = None,
    first: bool = False,
) -> None:
    """Score every job of every batch, at most `workers` at a time. Each batch goes in
    order of its jobs' analytic estimate per device (likely winners first, so that its
    floors cut the rest short); batches take turns, or with `first`, batch 0 goes before
    the others (whose jobs fill the workers it leaves idle: while its later jobs wait for
    its earlier ones, prune.py). `finished(k)` is called as soon as batch k's last job is
    done (its caller may then give the pool more work)."""
    t0 = time.perf_counter()
    guesses = [[estimate(inst, role, b.setting) for inst, role in b.jobs] for b in batches]
    if first and batches:
        queue = deque(_turns(batches[:1], guesses[:1]))
        queue += ((k + 1, i) for k, i in _turns(batches[1:], guesses[1:]))
    else:
        queue = deque(_turns(batches, guesses))
    left = [len(b.jobs) for b in batches]
    for b in batches:
        b.goodputs = [0.0] * len(b.jobs)

    def one_less(k: int) -> None:
        left[k] -= 1
        if left[k] == 0 and finished is not None:
            finished(k)

    running: dict[Future[tuple[float, float]], tuple[int, int, float, float]] = {}
    while queue or running:
        while queue and len(running) < max(1, workers):
            pick = next((n for n, (k, i) in enumerate(queue) if _ready(batches[k], i)), None)
            if pick is None and running:
                break  # wait: what is running decides the ceilings of what is left
            k, i = queue[pick or 0]
            del queue[pick or 0]
            b = batches[k]
            floor = b.floors.floor(i) if b.floors else 0.0
            if floor == math.inf:
                _say(progress, b, i, "skipped (no layout with it can win)")
                one_less(k)
                continue
            ceiling = b.floors.ceiling(i) if b.floors else math.inf
            args = (b.setting, *b.jobs[i], guesses[k][i], floor, ceiling)
            if pool is None:
                _done(batches[k], i, floor, ceiling, _score(args), guesses[k][i], t0, progress)
                one_less(k)
            else:
                running[pool.submit(_score, args)] = (k, i, floor, ceiling)
        if running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in sorted(done, key=lambda f: running[f][:2]):
                k, i, floor, ceiling = running.pop(f)
                _done(batches[k], i, floor, ceiling, f.result(), guesses[k][i], t0, progress)
                one_less(k)


def _ready(b: Batch, i: int) -> bool:
    return b.floors.ready(i) if b.floors else True


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
    ceiling: float,
    scored: tuple[float, float],
    guess: float,
    t0: float,
    progress: Progress,
) -> None:
    g, seconds = scored
    b.goodputs[i] = g
    b.seconds = time.perf_counter() - t0
    capped = g >= ceiling
    if capped:
        b.at_least.add(i)
    if b.floors:
        b.floors.record(i, g, capped)
    if capped:
        what = f"at least {g:.3f} req/s, stopped: more changes no layout (above {ceiling:.3f})"
    elif g > 0 or not floor:
        what = f"{g:.3f} req/s"
    else:
        what = f"below {floor:.3f} req/s, stopped: too slow to be part of a better layout"
    _say(progress, b, i, f"{what} (simulated in {seconds:.1f} s; rough estimate {guess:.3f})")


def _say(progress: Progress, b: Batch, i: int, what: str) -> None:
    if progress:
        inst, role = b.jobs[i]
        progress(f"{role} {inst.label}: {what}")


def _score(
    job: tuple[Setting, InstanceConfig, str, float, float, float],
) -> tuple[float, float]:
    """(goodput, seconds it took) of one job."""
    setting, inst, role, guess, floor, ceiling = job
    t0 = time.perf_counter()
    bounds = functools.partial(
        placement_goodput, setting, guess=guess, floor=floor, ceiling=ceiling
    )
    if role == "prefill":
        g = bounds(inst, None, only="ttft")
    elif role == "decode":
        g = bounds(None, inst, only="tpot")
    else:
        chunked = role == "chunked"
        g = bounds(None, None, colocated=inst, chunked=chunked)
    return g, time.perf_counter() - t0
