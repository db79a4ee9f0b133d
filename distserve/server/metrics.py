"""Prometheus metrics: latency histograms observed as requests progress, and per-instance
gauges (queues, KV blocks) read from the controller at scrape time."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from distserve.cluster.controller import Controller
from distserve.core import DecodeScheduler
from distserve.core.kv_store import KVStore
from distserve.runtime.outputs import RequestOutput
from distserve.runtime.transport import TransferStats

disable_created_metrics()  # no *_created series: dashboards do not use them

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


PHASES = {
    "queue": ("arrived", "prefill_start"),
    "prefill": ("prefill_start", "prefill_end"),
    "migration": ("migration_start", "migration_end"),
    "decode": ("decode_start", "decode_end"),
    "e2e": ("arrived", "finished"),
}
"""A request's phases, from the milestones the schedulers stamp (Request.timestamps)."""


class Metrics:
    """One registry per server (no module-level state), fed by the controller's hooks.
    Every series carries `model_name`, as vLLM's do, so dashboards built for it apply."""

    def __init__(self, model_name: str = "") -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, m = self.registry, ["model_name"]
        self.ttft = Histogram(
            "distserve_ttft_seconds",
            "Time to first token, by the role of the instance that made it",
            m + ["role"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "distserve_tpot_seconds",
            "Time per output token after the first, by the role that finished the request",
            m + ["role"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.phase = Histogram(
            "distserve_request_phase_seconds",
            "Seconds a request spent in each phase (queue, prefill, migration, decode, e2e)",
            m + ["phase"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "distserve_requests", "Finished requests by outcome", m + ["outcome"], registry=r
        )
        self.prompt_tokens = Counter(
            "distserve_prompt_tokens", "Prompt tokens of finished requests", m, registry=r
        )
        self.generation_tokens = Counter(
            "distserve_generation_tokens", "Output tokens of finished requests", m, registry=r
        )
        self.migrations = Counter("distserve_migrations", "KV migrations completed", m, registry=r)
        self.migration_bytes = Counter(
            "distserve_migration_bytes", "KV bytes migrated", m, registry=r
        )
        self.migration_seconds = Histogram(
            "distserve_migration_seconds", "Seconds per KV migration", m,
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.controller: Controller | None = None

    def attach(self, controller: Controller) -> None:
        self.controller = controller
        self.registry.register(_InstanceCollector(controller, self.model_name))

    # Observer hooks
    def on_first_token(self, ttft: float, role: str = "") -> None:
        self.ttft.labels(self.model_name, role).observe(ttft)

    def on_finished(
        self, outcome: str, tpot: float | None, done: RequestOutput | None = None, role: str = ""
    ) -> None:
        self.requests.labels(self.model_name, outcome).inc()
        if tpot is not None:
            self.tpot.labels(self.model_name, role).observe(tpot)
        if done is None:
            return
        self.prompt_tokens.labels(self.model_name).inc(len(done.prompt_token_ids))
        self.generation_tokens.labels(self.model_name).inc(len(done.token_ids))
        ts = done.timestamps
        for phase, (start, end) in PHASES.items():
            if start in ts and end in ts:
                self.phase.labels(self.model_name, phase).observe(ts[end] - ts[start])

    def on_migration(self, stats: TransferStats) -> None:
        self.migrations.labels(self.model_name).inc()
        self.migration_bytes.labels(self.model_name).inc(stats.num_bytes)
        self.migration_seconds.labels(self.model_name).observe(stats.seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _InstanceCollector:
    def __init__(self, controller: Controller, model_name: str) -> None:
        self.controller, self.model_name = controller, model_name

    def collect(self) -> Iterator[Any]:
        for family in self._families():  # every series gets the model_name label
            family.samples = [
                x._replace(labels={**x.labels, "model_name": self.model_name})
                for x in family.samples
            ]
            yield family

    def _families(self) -> Iterator[Any]:
        queue = GaugeMetricFamily(
            "distserve_queue_length",
            "Requests per queue per instance",
            labels=["instance", "role", "queue"],
        )
        blocks = GaugeMetricFamily(
            "distserve_kv_blocks", "KV blocks per instance", labels=["instance", "role", "state"]
        )
        up = GaugeMetricFamily(
            "distserve_instance_up",
            "1 while the instance's worker is alive",
            labels=["instance", "role"],
        )
        busy = CounterMetricFamily(
            "distserve_instance_busy_seconds",
            "Seconds spent executing steps",
            labels=["instance", "role"],
        )
        usage = GaugeMetricFamily(
            "distserve_kv_cache_usage",
            "Share of the instance's KV blocks held by requests (0-1)",
            labels=["instance", "role"],
        )
        prompt, hits, rate = _prefix_cache_families()
        for inst in self.controller.instances:
            s, labels = inst.scheduler, [inst.name, inst.role.value]
            up.add_metric(labels, 1.0 if inst.alive else 0.0)
            if not inst.alive:
                # a dead instance's scheduler still holds the requests it lost (rescued
                # elsewhere) and its blocks: only `up` says it exists until its replacement
                # runs under the same name
                continue
            queues = {
                "waiting": len(s.waiting),
                "running": len(s.running),
                "swapped": len(s.swapped),
            }
            if isinstance(s, DecodeScheduler):
                queues["pending_migration"] = len(s.pending)
            for name, n in queues.items():
                queue.add_metric([*labels, name], n)
            cached = s.blocks.num_cached_blocks  # free for allocation, holding a prefix
            blocks.add_metric([*labels, "used"], s.blocks.num_used_blocks)
            blocks.add_metric([*labels, "free"], s.blocks.num_free_blocks - cached)
            blocks.add_metric([*labels, "cached"], cached)
            total = s.blocks.num_used_blocks + s.blocks.num_free_blocks
            usage.add_metric(labels, s.blocks.num_used_blocks / total if total else 0.0)
            prompt.add_metric(labels, s.num_prompt_tokens_admitted)
            hits.add_metric(labels, s.num_prompt_tokens_cached)
            if s.num_prompt_tokens_admitted:
                rate.add_metric(labels, s.num_prompt_tokens_cached / s.num_prompt_tokens_admitted)
            busy.add_metric(labels, inst.stats.busy_seconds)
        flips = CounterMetricFamily(
            "distserve_role_flips", "Instances turned from one role", labels=["old", "new"]
        )
        counts = collections.Counter((f.old, f.new) for f in self.controller.flips.done)
        for (old, new), n in sorted(counts.items()):
            flips.add_metric([old, new], n)
        yield from (queue, blocks, usage, up, busy, prompt, hits, rate, flips)
        yield from _live_families(self.controller)
        if self.controller.store is not None:
            yield from _store_families(self.controller.store.directory)


def _live_families(controller: Controller) -> Iterator[GaugeMetricFamily]:
    """The live view (cluster/live.py): the window's arrival rate, lengths and SLO
    attainment (with serve --ttft-slo/--tpot-slo), and the current layout."""
    live, now = controller.live, time.monotonic()
    window = f"over the last {live.seconds:.0f} s"
    rate = GaugeMetricFamily("distserve_live_arrival_rate", f"Requests/s arriving {window}")
    rate.add_metric([], live.arrival_rate(now))
    lengths = GaugeMetricFamily(
        "distserve_live_tokens", f"Prompt and output lengths {window}", labels=["stat"]
    )
    for k, v in live.lengths(now).items():
        lengths.add_metric([k], v)
    attained = GaugeMetricFamily(
        "distserve_live_slo_attainment",
        f"Share of requests finished {window} within the target (ttft, tpot, both)",
        labels=["target"],
    )
    for k, v in live.attainment(now).items():
        attained.add_metric([k], v)
    layout = GaugeMetricFamily(
        "distserve_layout_instances", "Live instances per role", labels=["role"]
    )
    roles = collections.Counter(i.role.value for i in controller.instances if i.alive)
    for role in ("prefill", "decode", "colocated"):
        layout.add_metric([role], roles.get(role, 0))
    yield from (rate, lengths, attained, layout)


def _store_families(store: KVStore) -> Iterator[Any]:
    """The KV store (serve --kv-store-gb): its slots by state, what was written to it,
    and the requests resumed from it after their decode instance died; its disk tier
    (serve --kv-store-disk-gb): blocks there, spilled to it, read back, dropped."""
    slots = GaugeMetricFamily("distserve_kv_store_slots", "KV store slots", labels=["state"])
    cached = store.num_cached_slots
    slots.add_metric(["held"], store.num_slots - store.num_free_slots)
    slots.add_metric(["cached"], cached)
    slots.add_metric(["free"], store.num_free_slots - cached)
    st = store.stats
    counters = [
        ("distserve_kv_store_written_bytes", "KV bytes written to the store", st.bytes_written),
        ("distserve_kv_store_shared_blocks", "Full blocks found in the store already",
         st.blocks_shared),
        ("distserve_kv_store_loaded_blocks",
         "Full prompt blocks read from the store instead of computed", st.blocks_loaded),
        ("distserve_kv_store_evictions", "Cached slots evicted for new KV", st.evictions),
        ("distserve_kv_store_resumes", "Requests resumed from the store after a fault",
         st.resumes),
        ("distserve_kv_store_resumed_tokens", "Tokens whose KV a resume read from the store",
         st.tokens_resumed),
        ("distserve_kv_store_unwritten_requests", "Requests the full store stopped writing",
         st.broken),
        ("distserve_kv_store_spilled_blocks", "Evicted prefix blocks written to the disk tier",
         st.spilled),
        ("distserve_kv_store_disk_loaded_blocks",
         "Spilled blocks a prompt's prefix lookup read back from disk", st.blocks_from_disk),
        ("distserve_kv_store_disk_evictions", "Spilled blocks dropped from the full disk tier",
         st.disk_evictions),
    ]  # fmt: skip
    disk = GaugeMetricFamily(
        "distserve_kv_store_disk_blocks", "KV store blocks on disk", labels=["state"]
    )
    disk.add_metric(["used"], store.num_disk_blocks)
    disk.add_metric(["free"], store.num_disk_slots - store.num_disk_blocks)
    yield slots
    yield disk
    for name, doc, value in counters:
        family = CounterMetricFamily(name, doc)
        family.add_metric([], value)
        yield family


def _prefix_cache_families() -> tuple[CounterMetricFamily, CounterMetricFamily, GaugeMetricFamily]:
    """Prompt tokens of first prefills per instance, those a prefix-cache hit supplied,
    and their ratio (counters restart with a restarted instance, as its cache does)."""
    return (
        CounterMetricFamily(
            "distserve_prefix_cache_prompt_tokens",
            "Prompt tokens of requests prefilled here",
            labels=["instance", "role"],
        ),
        CounterMetricFamily(
            "distserve_prefix_cache_hit_tokens",
            "Prompt tokens a prefix-cache hit supplied (not computed)",
            labels=["instance", "role"],
        ),
        GaugeMetricFamily(
            "distserve_prefix_cache_hit_rate",
            "Cached prompt tokens / prompt tokens since the instance started",
            labels=["instance", "role"],
        ),
    )
