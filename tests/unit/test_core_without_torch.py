"""The engine core, the configs, the model registry, the simulator and the planner work
where torch is absent, and `import distserve` alone does not load torch. Each check runs
in a fresh interpreter so that modules other tests imported cannot hide an import."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_TORCH = """
import importlib.abc
import sys


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test ({name})")
        return None


sys.meta_path.insert(0, _NoTorch())
for mod in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
    del sys.modules[mod]
"""


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_blocker_blocks_torch() -> None:
    # Otherwise the tests below would pass for the wrong reason.
    proc = run_python(BLOCK_TORCH + "\nimport torch\n")
    assert proc.returncode != 0
    assert "torch is blocked" in proc.stderr


def test_core_runs_a_scheduler_loop_without_torch() -> None:
    code = (
        BLOCK_TORCH
        + """
import distserve.core
import distserve.model.config
import distserve.model.registry
import distserve.config
from distserve.core import (
    BlockManager, ColocatedScheduler, Request, SamplingParams, SchedulerConfig, StepResult,
)

sched = ColocatedScheduler(
    SchedulerConfig(max_model_len=32, max_num_batched_tokens=32), BlockManager(8, 4)
)
reqs = [
    Request(f"r{i}", [1, 2, 3, 4 + i], SamplingParams(max_tokens=3 + i, ignore_eos=True), 0.0)
    for i in range(3)
]
for r in reqs:
    sched.add_request(r)
now = 0.0
while sched.has_unfinished():
    plan = sched.schedule(now)
    sampled = {c.request_id: 7 for c in plan.chunks if c.sampling_params is not None}
    sched.update(plan, StepResult(sampled=sampled), now)
    sched.blocks.check_integrity()
    now += 1.0
    assert now < 100, "no progress"
assert [r.output_token_ids for r in reqs] == [[7] * 3, [7] * 4, [7] * 5]
assert sched.blocks.num_free_blocks == 8
assert "torch" not in sys.modules
print("ok")
"""
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_import_distserve_does_not_import_torch() -> None:
    proc = run_python(
        """
        import sys
        import distserve
        params = distserve.SamplingParams(max_tokens=2)
        assert params.max_tokens == 2
        print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_every_sim_and_planner_module_imports_without_torch() -> None:
    """All of them, listed from the packages themselves so that a new module is checked
    too (the planner's profiler needs torch only inside its functions)."""
    code = (
        BLOCK_TORCH
        + """
import importlib
import pkgutil

import distserve.planner
import distserve.sim

names, failed = [], []
for pkg in (distserve.sim, distserve.planner):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        names.append(info.name)
        try:
            importlib.import_module(info.name)
        except ImportError as e:
            failed.append(f"{info.name}: {e}")
assert len(names) >= 8, names
assert not failed, "needs torch at import:\\n" + "\\n".join(failed)
assert "torch" not in sys.modules
print("ok")
"""
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
