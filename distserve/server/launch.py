"""`distserve serve`: start the workers, then the HTTP server; print the URL when ready."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from distserve.cluster.adaptive import AdaptiveConfig
from distserve.cluster.controller import Controller
from distserve.cluster.decode_prefill import DecodePrefillConfig
from distserve.cluster.live import LiveWindow
from distserve.cluster.local_ray import is_loopback
from distserve.cluster.placement import ClusterJoinError
from distserve.config import TRANSPORTS, EmulationConfig, EngineConfig, PlacementConfig
from distserve.server.api_processes import ApiProcesses, listening_socket, start_http
from distserve.server.frontend import LocalFrontend
from distserve.server.link_server import LinkServer
from distserve.server.metrics import Metrics

log = logging.getLogger("distserve")


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the API listens."""

    host: str = field(
        default="127.0.0.1", metadata={"help": "interface to bind (127.0.0.1: this machine only)"}
    )
    port: int = field(default=8000, metadata={"help": "TCP port; 0 picks a free one"})
    api_key: str | None = field(
        default=None, repr=False, metadata={"help": "require 'Authorization: Bearer KEY'"}
    )
    ray_address: str | None = field(
        default=None, metadata={"help": "join this Ray cluster instead of starting one"}
    )
    use_ray: bool = field(
        default=True, metadata={"help": "workers as Ray actors (False: in this process)"}
    )
    transport: str = field(
        default="auto", metadata={"help": "KV migration transport: " + ", ".join(TRANSPORTS)}
    )
    max_queued: int = field(
        default=512, metadata={"help": "prompts waiting for prefill before new ones get 429"}
    )
    max_body_mb: float = field(default=8.0, metadata={"help": "largest request body (MiB)"})
    header_timeout: float = field(
        default=10.0, metadata={"help": "seconds a connection may take to send a request head"}
    )
    body_timeout: float = field(
        default=30.0, metadata={"help": "seconds a request body may take after its head"}
    )
    max_connections: int = field(
        default=1024, metadata={"help": "open connections; requests beyond them get 503"}
    )
    trace_steps: str | None = field(
        default=None, metadata={"help": "write one JSON line per instance step to this file"}
    )
    orphan_timeout: float = field(
        default=300.0,
        metadata={"help": "seconds a request waits for a role with no live instance, then fails"},
    )
    ttft_slo: float | None = field(
        default=None, metadata={"help": "TTFT target of the live view's attainment (s)"}
    )
    tpot_slo: float | None = field(
        default=None, metadata={"help": "TPOT target of the live view's attainment (s)"}
    )
    live_window: float = field(
        default=120.0, metadata={"help": "seconds of traffic the live view keeps"}
    )
    degrade_after: float | None = field(
        default=10.0,
        metadata={"help": "seconds a role may be down before the other serves end to end"},
    )
    kv_store_gb: float = field(
        default=0.0,
        metadata={"help": "GiB of host memory for the KV store (0: none; core/kv_store.py)"},
    )
    kv_store_disk_gb: float = field(
        default=0.0,
        metadata={"help": "GiB of disk the KV store spills evicted prefix blocks to (0: none)"},
    )
    kv_store_disk_dir: str | None = field(
        default=None,
        metadata={"help": "directory of the spill file (None: the temporary directory)"},
    )
    prefill_on_decode: DecodePrefillConfig | None = field(
        default=None,
        metadata={"help": "decode instances may prefill short prompts (core/routing.py)"},
    )
    api_servers: int = field(
        default=0,
        metadata={
            "help": "HTTP API processes apart from the controller's (0: the API runs in the "
            "controller's process; server/api_processes.py)"
        },
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if not 0 <= self.kv_store_gb < float("inf"):
            raise ValueError(f"kv_store_gb must be >= 0, got {self.kv_store_gb}")
        self._check_disk_tier()
        if self.max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {self.max_queued}")
        if not self.max_body_mb > 0:
            raise ValueError(f"max_body_mb must be > 0, got {self.max_body_mb}")
        for name in ("header_timeout", "body_timeout", "orphan_timeout"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if not 0 <= self.api_servers <= 64:
            raise ValueError(f"api_servers must be in [0, 64], got {self.api_servers}")

    def _check_disk_tier(self) -> None:
        if not 0 <= self.kv_store_disk_gb < float("inf"):
            raise ValueError(f"kv_store_disk_gb must be >= 0, got {self.kv_store_disk_gb}")
        if self.kv_store_disk_gb and not self.kv_store_gb:
            raise ValueError("kv_store_disk_gb needs a KV store in memory (--kv-store-gb) too")
        d = self.kv_store_disk_dir
        if d is not None and not self.kv_store_disk_gb:
            raise ValueError("kv_store_disk_dir needs a disk tier (--kv-store-disk-gb) too")
        if d is not None and not (os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK)):
            raise ValueError(f"kv_store_disk_dir must be a writable directory, got {d!r}")


async def serve(
    engine: EngineConfig,
    placement: PlacementConfig,
    server: ServerConfig,
    emulation: EmulationConfig | None = None,
    adaptive: AdaptiveConfig | None = None,
) -> None:
    model_name = os.path.basename(engine.model.rstrip("/")).removesuffix(".gguf")
    metrics = Metrics(model_name)
    controller = Controller(
        engine,
        placement,
        use_ray=server.use_ray,
        ray_address=server.ray_address,
        ray_loopback=is_loopback(server.host),  # the API on loopback: Ray on it too
        observer=metrics,
        transport=server.transport,
        max_queued=server.max_queued,
        orphan_timeout=server.orphan_timeout,
        step_trace=server.trace_steps,
        emulation=emulation,
        live=LiveWindow(server.live_window, server.ttft_slo, server.tpot_slo),
        adaptive=adaptive,
        degrade_after=server.degrade_after,
        kv_store_gb=server.kv_store_gb,
        kv_store_disk=(server.kv_store_disk_gb, server.kv_store_disk_dir),
        prefill_on_decode=server.prefill_on_decode,
    )
    where = f" on emulated devices ({emulation.profile})" if emulation else ""
    print(
        f"starting {len(placement.roles)} instances ({placement.mode}: "
        f"{', '.join(placement.roles)}) of {engine.model}{where} ...",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.perf_counter()
    try:
        await controller.start()
    except (ClusterJoinError, ValueError, TimeoutError) as e:  # nothing to serve with
        print(f"distserve serve: error: {e}", file=sys.stderr, flush=True)
        await controller.stop()
        raise SystemExit(2) from None
    for name, r in zip(placement.roles, controller.kernel_rows, strict=False):
        if r is not None:  # what the worker chose at start; a detail for debugging speed
            which = "every step" if r == sys.maxsize else f"steps of up to {r} tokens"
            log.debug("%s worker uses the packed bf16 kernels for %s", name, which)
    print(
        f"instances ready in {time.perf_counter() - t0:.1f} s (the slowest worker's own "
        f"model load and setup: {controller.load_seconds:.1f} s)",
        file=sys.stderr,
        flush=True,
    )
    metrics.attach(controller)
    frontend = LocalFrontend(controller, metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    numerics = "" if emulation is not None else f", {engine.dtype}"
    try:
        if server.api_servers:
            await _serve_apart(controller, frontend, model_name, numerics, server, stop)
        else:
            await _serve_here(frontend, model_name, numerics, server, stop)
    finally:
        await controller.stop()


def _bind(server: ServerConfig) -> socket.socket:
    """The API's listening socket; a clear error naming the flag if it cannot be had."""
    try:
        return listening_socket(server.host, server.port)
    except OSError as e:
        where = f"{server.host}:{server.port}"
        print(f"distserve serve: error: --port/--host {where}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _ready(server: ServerConfig, port: int, model_name: str, numerics: str) -> None:
    # What startup made (tokenizer tables, model configs, the app: ~200k objects, a full
    # collection of them 80 ms) lives as long as the server: kept out of the collector's
    # scans, a full collection no longer stalls every instance's step loop for that long
    # (vLLM freezes its startup objects the same way)
    gc.collect()
    gc.freeze()
    url = f"http://{server.host}:{port}/v1"
    print(f"distserve ready: {url} (model {model_name}{numerics})", flush=True)


def _http_settings(server: ServerConfig, model_name: str) -> dict[str, Any]:
    """What `start_http` needs of the server's configuration."""
    return {
        "model_name": model_name,
        "api_key": server.api_key,
        "max_body_bytes": int(server.max_body_mb * 2**20),
        "body_timeout": server.body_timeout,
        "header_timeout": server.header_timeout,
        "max_connections": server.max_connections,
    }


async def _serve_here(
    frontend: LocalFrontend,
    model_name: str,
    numerics: str,
    server: ServerConfig,
    stop: asyncio.Event,
) -> None:
    """The HTTP server in this process, on the controller's event loop."""
    sock = _bind(server)
    started = await start_http(frontend, _http_settings(server, model_name), sock)
    if started is None:
        raise RuntimeError("the HTTP server did not start")
    httpd, task = started
    _ready(server, sock.getsockname()[1], model_name, numerics)
    await stop.wait()
    httpd.should_exit = True
    await task


async def _serve_apart(
    controller: Controller,
    frontend: LocalFrontend,
    model_name: str,
    numerics: str,
    server: ServerConfig,
    stop: asyncio.Event,
) -> None:
    """`server.api_servers` HTTP processes, linked to this one (server/api_processes.py)."""
    n = server.api_servers
    hello = _http_settings(server, model_name) | {
        "tokenizer": controller.tokenizer,
        "max_model_len": controller.max_model_len,
        "max_connections": -(-server.max_connections // n),  # the limit, shared out
    }
    with tempfile.TemporaryDirectory(prefix="distserve-api-") as tmp:
        links = LinkServer(frontend, os.path.join(tmp, "link"), hello)
        await links.start()
        sock = _bind(server)
        procs = ApiProcesses(n, links.path, sock, links.ready)
        try:
            try:
                await procs.start()
            except RuntimeError as e:
                print(f"distserve serve: error: --api-servers {n}: {e}", file=sys.stderr)
                raise SystemExit(2) from None
            _ready(server, sock.getsockname()[1], model_name, numerics)
            await stop.wait()
        finally:
            await procs.stop()
            await links.stop()
