"""Step-trace files (`serve --trace-steps`: one JSON line per step, appended while the
server runs): the lines a run added, their byte span, the lines of saved spans, and the
trace kept gzipped next to a run's results."""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Sequence


def trace_lines_since(trace: str, start: int) -> list[str]:
    """The whole lines of `trace` from byte offset `start` on."""
    with open(trace) as f:
        f.seek(start)
        return f.read().split("\n")[:-1]  # whole lines only: the server may be writing


def span_end(start: int, lines: list[str]) -> int:
    """The byte offset just past `lines`, read from `start` of a trace."""
    return start + sum(len(line.encode()) + 1 for line in lines)


def trace_spans(trace: str, spans: Sequence[Sequence[int]]) -> list[list[str]]:
    """The whole lines of a trace between each (start, end) pair of byte offsets; the
    trace may be gzipped (`trace` + '.gz', as results are kept)."""
    if not os.path.exists(trace) and os.path.exists(trace + ".gz"):
        with gzip.open(trace + ".gz", "rb") as g:
            data = g.read()
    else:
        with open(trace, "rb") as f:
            data = f.read()
    return [data[start:end].decode().split("\n")[:-1] for start, end in spans]


def gzip_file(path: str) -> None:
    """Compress `path` to `path`.gz and remove it (a step trace, kept with results)."""
    with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(path)


def remove_trace(path: str) -> None:
    """Remove a step trace left by an earlier run, raw or gzipped (a server appends)."""
    for old in (path, path + ".gz"):
        if os.path.exists(old):
            os.remove(old)
