"""Workloads: requests (prompt tokens, output length) plus arrival times, built from a
seed so the same requests can be replayed against a live server or the simulator."""

from distserve.workload.spec import Workload, WorkloadRequest

__all__ = ["Workload", "WorkloadRequest"]
