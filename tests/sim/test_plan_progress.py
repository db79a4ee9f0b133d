"""What `plan` prints per scored shape (issue 24): the simulated goodput, and the analytic
number that ordered the search called what it is, an estimate. It was printed as a
"bound" and a shape's goodput could come out above it (here decode: 147 against 128)."""

from __future__ import annotations

import re

from distserve.planner.estimates import estimate
from distserve.planner.search import Cluster, algorithm1, candidates
from tests.sim.test_planner import TP1, TP2, _setting


def test_plan_progress_says_estimate_and_the_goodput_may_exceed_it() -> None:
    setting, cluster = _setting(), Cluster(1, 4)
    shapes = candidates([TP1, TP2], cluster)
    lines: list[str] = []
    # unpruned: a pruned search may stop decode at a ceiling below its goodput (prune.py)
    algorithm1(
        setting, shapes, shapes, cluster, None, workers=1, progress=lines.append, prune=False
    )
    assert len(lines) == 4  # two prefill shapes, two decode shapes
    assert not any("bound" in line for line in lines), lines
    scored = {}
    for line in lines:
        m = re.fullmatch(
            r"(\w+) (tp\d pp\d): (?:([\d.]+) req/s|(?:below|at least) [\d.]+ req/s, stopped: .+) "
            r"\(simulated in [\d.]+ s; rough estimate ([\d.]+)\)",
            line,
        )
        assert m, line
        role, label, goodput, guess = m.groups()
        inst = next(s for s in shapes if s.label == label)
        assert float(guess) == round(estimate(inst, role, setting), 3)
        if goodput:
            scored[(role, label)] = (float(goodput), float(guess))
    g, guess = scored[("decode", "tp1 pp1")]
    assert g > guess  # why "bound" was wrong: the simulated goodput is above it
