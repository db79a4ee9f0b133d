"""Latency model and simulator. Torch-free: imports core/ and workload/ only."""
