"""CPU 'devices': an instance owns a set of cores; its torch threads run only there."""

from __future__ import annotations

import contextlib
import os

import torch


def available_cores() -> list[int]:
    return (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else list(range(os.cpu_count() or 1))
    )


def pin_to_cores(cores: list[int] | None) -> list[int]:
    """Restrict this process (every thread it has; later threads inherit) to `cores`
    (None: all it may use) and size torch's thread pool to match. Returns the cores."""
    allowed = available_cores()
    cores = allowed if cores is None else cores
    bad = [c for c in cores if c not in allowed]
    if bad or not cores:
        raise ValueError(f"cores {cores} are not a non-empty subset of the usable cores {allowed}")
    if hasattr(os, "sched_setaffinity"):
        tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
        for tid in tasks:  # a thread may end meanwhile, or be one we may not touch
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.sched_setaffinity(int(tid), cores)
    torch.set_num_threads(len(cores))
    return cores
