"""Where the benchmarks put a run's raw detail (per-request results, step traces): outside
the source tree, so that megabytes of it cannot be committed by accident. The summaries
(the tables the README quotes) stay in benchmarks/results/.

    $DISTSERVE_RUNS_DIR/<name>                          when set
    ${DISTSERVE_CACHE:-~/.cache/distserve}/runs/<name>  otherwise
"""

from __future__ import annotations

import os


def runs_dir(name: str) -> str:
    """The directory for the raw detail of the run called `name` (not created here)."""
    root = os.environ.get("DISTSERVE_RUNS_DIR")
    if not root:
        cache = os.environ.get("DISTSERVE_CACHE") or os.path.join(
            os.path.expanduser("~"), ".cache", "distserve"
        )
        root = os.path.join(cache, "runs")
    return os.path.join(root, name)


def details_dir_for(output: str) -> str:
    """The default details directory of a run whose summary goes to `output`: the runs
    directory named after the file (`.../sim_fidelity-epyc.json` ->
    `runs/sim_fidelity-epyc`), so that runs with different outputs keep their detail
    apart and `--resimulate` or `--reanalyse` of an output finds its own."""
    name = os.path.splitext(os.path.basename(os.path.normpath(output)))[0]
    return runs_dir(name)
