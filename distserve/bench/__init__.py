"""The live side of benchmarking: load client, runs and sweeps against a server, the
server's calibration, plots. What a run measured is scored by `distserve.metrics`."""
