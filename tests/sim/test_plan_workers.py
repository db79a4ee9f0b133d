"""A plan does not depend on how many worker processes made it: with a pool, the
baselines are verified as soon as they are scored, beside the search's last jobs, and
their verified goodputs are those of a plan made in one process."""

from __future__ import annotations

import pytest

from distserve.planner.plan import make_plan
from distserve.planner.search import Cluster
from tests.sim.test_low_affinity import DECODE, PREFILL
from tests.sim.test_low_affinity import _setting as low_setting
from tests.sim.test_planner import TP1, TP2
from tests.sim.test_planner import _setting as high_setting


def _layouts(plan: dict) -> dict:  # type: ignore[type-arg]
    """What a plan decides (the jobs' table is left out: which jobs stop early depends on
    the order in which the workers finish them, the choice does not)."""
    return {
        "recommended": plan["recommended"],
        "disagg": plan["disagg"],
        "baselines": plan["baselines"],
        "before_verification": plan["phase_goodputs"]["before_verification"],
    }


@pytest.mark.parametrize("affinity", ["high", "low"])
def test_one_worker_and_two_make_the_same_plan(affinity: str) -> None:
    if affinity == "high":
        args = (high_setting(), [TP1, TP2], None, Cluster(1, 4))
    else:
        args = (low_setting(), PREFILL, DECODE, Cluster(2, 3))
    one = make_plan(*args, affinity=affinity, workers=1)  # type: ignore[arg-type]
    two = make_plan(*args, affinity=affinity, workers=2)  # type: ignore[arg-type]
    assert _layouts(one) == _layouts(two)
    assert one["baselines"]["colocated"] is not None
