"""Latency model, serving path, simulator, and reading step traces into a serving path.
Torch-free: imports core/, metrics/, workload/, the configs and the model registry."""
