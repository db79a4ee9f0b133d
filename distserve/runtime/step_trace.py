"""A per-step record of what each instance ran and how long it took, one JSON line per
step (`distserve serve --trace-steps FILE`): for checking the simulator's latency model
against the real serving path, and for finding where a slow request's time went."""

from __future__ import annotations

import json
import time
from typing import TextIO

from distserve.core import StepPlan
from distserve.core.plan import StepResult


class StepTrace:
    """Appends one line per step: instance, role, start (`t`, Unix time: a file kept
    across server restarts stays in time order), the round trip as the controller saw it
    (`seconds`), the worker's own time (`exec`), prompt chunk lengths (`prefill`) and
    their first positions (`prefill_start`, > 0 for a later chunk of a chunked prompt),
    and decode context lengths (`decode`)."""

    def __init__(self, path: str) -> None:
        self._file: TextIO = open(path, "a", buffering=1)  # noqa: SIM115 (closed in close())
        # Unix time of a perf_counter() reading: one clock read, then steps on perf_counter
        self._t0 = time.time() - time.perf_counter()

    def record(
        self, instance: str, role: str, start: float, plan: StepPlan, result: StepResult
    ) -> None:
        line = {
            "instance": instance,
            "role": role,
            "t": round(self._t0 + start, 6),
            "seconds": round(time.perf_counter() - start, 6),
            "exec": round(result.elapsed, 6),
            "prefill": [c.num_tokens for c in plan.prefill_chunks],
            "prefill_start": [c.start for c in plan.prefill_chunks],
            "prefill_ids": [c.request_id for c in plan.prefill_chunks],
            "decode": [c.context_len for c in plan.decode_chunks],
        }
        self._file.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self._file.close()
