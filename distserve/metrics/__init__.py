"""What a run measured, real or simulated: per-request results and their file
(`results`), SLO attainment and the SLO-scale search (`slo`), goodput from a rate sweep
(`goodput`), latency percentiles and run summaries (`summary`). Pure functions of request
results: imports nothing else of distserve and never torch, so the simulator, the
planner and the live benchmark client all score runs with the same code."""
