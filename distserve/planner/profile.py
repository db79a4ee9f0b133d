"""The profiler: times the real model runner on a grid of prefill batches and decode
steps (warm-up excluded, median of repetitions) and fits a latency Profile.

    distserve profile --model smollm2-135m --cores 1 --output profile.json
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from distserve.config import EngineConfig
from distserve.core import StepPlan
from distserve.planner.fit import error_summary, fit_decode, fit_prefill
from distserve.sim.profile import Profile

PREFILL_GRID = [
    (n, b) for n in (16, 64, 128, 256, 512, 1024, 2048) for b in (1, 2, 4) if n * b <= 4096
]
DECODE_GRID = [(b, c) for b in (1, 2, 4, 8, 16, 32, 64) for c in (64, 256, 512, 1024)]
QUICK_PREFILL = [(n, b) for n in (32, 128, 512) for b in (1, 2)]
QUICK_DECODE = [(b, c) for b in (1, 4, 16) for c in (64, 512)]
ROUNDS = 3

StartInstance = Callable[
    [EngineConfig, list[int], int, int], tuple[Callable[[StepPlan], Any], Any, Callable[[], None]]
]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def profile_path_for_this_cpu(directory: str, stem: str) -> str:
    """`directory/stem-<this CPU's vendor and family>.json`, e.g. ...-intel-xeon.json."""
    words = re.findall(r"[a-z0-9]+", re.sub(r"\((r|tm)\)", "", cpu_name().lower()))
    slug = "-".join(w for w in words if w not in ("processor", "cpu", "core"))[:40]
    return os.path.join(directory, f"{stem}-{slug or 'cpu'}.json")


def require_this_cpu(profile: Profile, path: str) -> None:
    """Refuse a CPU profile measured on another CPU: it predicts nothing here (a 512-token
    prefill of SmolLM2 on one core: 0.63 s on an AMD EPYC, 2.2 s with the same kernels on
    an Intel Xeon)."""
    here = cpu_name()
    if not profile.hardware.startswith(here):
        raise SystemExit(
            f"--profile {path} was measured on {profile.hardware!r}, this machine is "
            f"{here!r}: pass a new --profile path to profile this machine (made if missing)"
        )


def _times(
    execute: Callable[[StepPlan], Any], plan: StepPlan, reps: int, warm_up: bool
) -> list[float]:
    if warm_up:
        execute(plan)  # excluded
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        execute(plan)
        times.append(time.perf_counter() - t0)
    return times


def profile_model(
    config: EngineConfig,
    cores: int,
    quick: bool = False,
    progress: bool = True,
    tp: int = 1,
    pp: int = 1,
    start_instance: StartInstance | None = None,
) -> Profile:
    """Measure and fit. Runs the model in this process, pinned to the first `cores` cores;
    a tp x pp instance runs as `serve` runs it: `start_instance(config, cores, tp, pp)`
    (cli/profile.py: Ray workers sharing those cores) gives (execute, info, close)."""
    from tqdm import tqdm

    from distserve.runtime.worker.synthetic import SyntheticPlans
    from distserve.runtime.worker.threads import available_cores
    from distserve.runtime.worker.worker import Worker

    usable = available_cores()
    if cores > len(usable):
        raise ValueError(f"cores must be <= the {len(usable)} usable cores, got {cores}")
    close: Callable[[], None] = lambda: None  # noqa: E731
    if tp * pp > 1:
        if start_instance is None:
            raise ValueError("a tp/pp > 1 instance needs start_instance")
        execute, info, close = start_instance(config, usable[:cores], tp, pp)
    else:
        worker = Worker(config, usable[:cores])
        execute, info = worker.execute, worker.info()
    mcfg = info.model_config
    plans = SyntheticPlans(info.num_blocks, info.block_size, mcfg.vocab_size)
    pgrid, dgrid = (QUICK_PREFILL, QUICK_DECODE) if quick else (PREFILL_GRID, DECODE_GRID)
    limit = min(config.scheduler.max_model_len, mcfg.max_position_embeddings)
    pgrid = [
        (n, b) for n, b in pgrid if n <= limit and (n * b) // info.block_size + b <= info.num_blocks
    ]
    # the step jumps where the worker leaves its packed kernels: measure both sides of it
    kernel_rows = info.kernel_rows if info.kernel_rows not in (None, sys.maxsize) else None
    if kernel_rows:
        known = {b for b, _ in dgrid}
        contexts = sorted({c for _, c in dgrid})
        for b in (kernel_rows, kernel_rows + 1):
            if b not in known:
                dgrid += [(b, c) for c in contexts]
    dgrid = [
        (b, c) for b, c in dgrid if c < limit and b * (c // info.block_size + 1) <= info.num_blocks
    ]
    # The grid is measured in ROUNDS passes and each shape takes the median of all its
    # times: this VM's speed drifts (up to 2x within an hour), and a shape measured in one
    # go took whatever the machine did then (one profile's 512-token prefill read 0.80 s
    # where its neighbours' fit said 0.55 s and served requests took 0.83 s).
    rounds = 1 if quick else ROUNDS
    p_reps, d_reps = (2, 4) if quick else (1, 4)
    p_samples: list[list[float]] = [[] for _ in pgrid]
    d_samples: list[list[float]] = [[] for _ in dgrid]
    bar = tqdm(
        total=rounds * (len(pgrid) + len(dgrid)),
        desc="profiling",
        unit="shape",
        disable=not progress,
    )
    for r in range(rounds):
        for i, (n, b) in enumerate(pgrid):
            p_samples[i] += _times(execute, plans.prefill(n, b), p_reps, r == 0)
            plans.release()
            bar.update(1)
        for i, (b, c) in enumerate(dgrid):
            # decode steps are short and noisy (a stray interrupt is a large share): more reps
            d_samples[i] += _times(execute, plans.decode(b, c), d_reps, r == 0)
            plans.release()
            bar.update(1)
    bar.close()
    close()
    p_batches = [[n] * b for n, b in pgrid]
    p_times = [statistics.median(t) for t in p_samples]
    d_batches = [[c] * b for b, c in dgrid]
    d_times = [statistics.median(t) for t in d_samples]
    prefill, p_err = fit_prefill(p_batches, p_times)
    small, large, threshold, d_err = fit_decode(
        d_batches, d_times, None if kernel_rows is None else kernel_rows + 1
    )
    samples = {
        "prefill": [[bt, t] for bt, t in zip(p_batches, p_times, strict=True)],
        "decode": [[len(bt), bt[0], t] for bt, t in zip(d_batches, d_times, strict=True)],
    }
    return Profile(
        model=os.path.basename(config.model.rstrip("/")).removesuffix(".gguf"),
        hardware=f"{cpu_name()} ({cores} core{'s' if cores > 1 else ''})",
        tp=tp,
        pp=pp,
        prefill=prefill,
        decode_small=small,
        decode_large=large,
        decode_threshold=threshold,
        kv_capacity_tokens=info.num_blocks * info.block_size * pp,  # all pp slots
        dtype=config.dtype,
        cores=cores,
        source=f"measured by `distserve profile` on {time.strftime('%Y-%m-%d')}",
        fit={
            "prefill": error_summary(p_err),
            "decode": error_summary(d_err),
            "samples": samples,
            "kv_bytes_per_token": mcfg.kv_bytes_per_token(4 if config.dtype == "float32" else 2),
            "kernel_rows": info.kernel_rows,
        },
    )
