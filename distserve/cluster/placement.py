"""Turning a PlacementConfig into workers: which cores each owns, where it runs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from typing import TYPE_CHECKING

from distserve.cluster import local_ray
from distserve.config import EngineConfig, PlacementConfig
from distserve.runtime.emulated import EmulatedExecutor
from distserve.runtime.executor import Executor, LocalExecutor, RayExecutor
from distserve.runtime.parallel_executor import ParallelExecutor
from distserve.runtime.worker.threads import available_cores
from distserve.runtime.worker.worker import WorkerInfo

if TYPE_CHECKING:
    from distserve.cluster.emulation import EmulatedCluster

log = logging.getLogger(__name__)


def role_engine_config(engine: EngineConfig, placement: PlacementConfig, role: str) -> EngineConfig:
    """The engine config of one instance: prefill and decode may size their KV caches
    differently (`prefill_kv_cache_gb`, `decode_kv_cache_gb`)."""
    gib = {"prefill": placement.prefill_kv_cache_gb, "decode": placement.decode_kv_cache_gb}.get(
        role
    )
    if gib is None:
        return engine
    return dataclasses.replace(
        engine, cache=dataclasses.replace(engine.cache, kv_cache_gb=gib, num_blocks=None)
    )


_last_init: tuple[str | None, int, bool] | None = None
"""The arguments init_ray last started or joined a cluster with (reinit_ray repeats them)."""


def reinit_ray() -> None:
    """After the cluster was left (its raylet lost: local_ray.RayLink), start a fresh local
    one or join again, as init_ray last did; raises if it cannot."""
    if _last_init is None:
        raise RuntimeError("no Ray cluster was started or joined in this process")
    init_ray(*_last_init)


class ClusterJoinError(RuntimeError):
    """`--ray-address` names a cluster this process could not join."""


def join_error_message(address: str, error: BaseException) -> str:
    """What went wrong joining `address`, and what to do (token authentication, which a
    `ray start --head` cluster may require, is the usual surprise)."""
    first = (str(error).strip().splitlines() or [""])[0][:300]
    msg = (
        f"--ray-address {address}: could not join the Ray cluster ({type(error).__name__}: {first})"
    )
    text = str(error).lower()
    if any(w in text for w in ("auth", "token", "unauthenticated", "permission")):
        msg += (
            ". The cluster requires authentication: export RAY_AUTH_MODE=token (and the "
            "cluster's token, as `ray start` printed it) before `distserve serve`"
        )
    else:
        msg += ". Is `ray start --head` running there, and is the address its GCS (host:6379)?"
    return msg + " (docs/multi-node.md)"


def probe(address: str, timeout: float = 5.0) -> None:
    """Raise ConnectionError unless something accepts a TCP connection at host:port
    (`auto` and `ray://` addresses are left to Ray)."""
    import socket

    if address == "auto" or "://" in address or ":" not in address:
        return
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout).close()
    except (OSError, ValueError) as e:
        raise ConnectionError(f"nothing accepts connections at {address}: {e}") from None


def init_ray(address: str | None, num_cpus: int, loopback: bool = True) -> None:
    """Join a cluster at `address`, or start a local one (the embedded default) with
    `num_cpus` logical CPUs, enough for every instance even when cores are shared, whose
    workers run at the caller's priority (Ray's default is nice 15). A local cluster
    listens on 127.0.0.1 only with `loopback`, and ends when this process ends, however
    it ends (cluster/local_ray.py)."""
    if not address:
        local_ray.prepare(loopback)  # before Ray's first import: it reads them then
    import ray

    if ray.is_initialized():
        return
    global _last_init
    _last_init = (address, num_cpus, loopback)
    kwargs = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        try:
            probe(address)  # Ray itself retries a dead address for minutes
            ray.init(address=address, **kwargs)  # type: ignore[arg-type]
        except Exception as e:  # noqa: BLE001 (Ray raises many kinds; all mean "not joined")
            raise ClusterJoinError(join_error_message(address, e)) from e
    else:
        # Ray starts workers at nice 15, below the API server and the controller that
        # feed them: on a CPU the frontend then preempts the model it waits for (the step
        # trace showed model steps 1.2-1.6x slower under load). Workers run the critical
        # path, so they get the frontend's priority.
        # address="local": a cluster of our own even where RAY_ADDRESS is set or `ray start`
        # left one recorded on this machine (ray.init would join that one and then refuse
        # num_cpus)
        with local_ray.reaped():
            ray.init(
                address="local",
                num_cpus=num_cpus,
                _system_config={"worker_niceness": 0},
                **kwargs,  # type: ignore[arg-type]
            )


async def start_workers(
    engine: EngineConfig,
    placement: PlacementConfig,
    use_ray: bool,
    ray_address: str | None,
    timeout: float,
    emulated: EmulatedCluster | None = None,
    loopback: bool = True,
) -> list[Executor]:
    """Start one worker per instance of the placement (in parallel) and wait until every
    one has loaded its model; raise TimeoutError naming the missing resources. With
    `emulated`, the workers are its emulated devices (no Ray, nothing to load). A local
    Ray cluster started here listens on loopback only with `loopback`."""
    if emulated is not None:
        return list(emulated.executors())
    roles, groups = placement.roles, placement.groups
    cores = group_cores(placement, engine.device)
    configs = [role_engine_config(engine, placement, r) for r, _, _ in groups]
    if use_ray:
        # logical CPUs only gate where actors go (workers pin their own cores): a local
        # cluster gets room for later, larger placements in this process (Ray starts once)
        num_cpus = max(4 * len(available_cores()), sum(len(c) for c in cores))
        init_ray(ray_address, num_cpus, loopback)
    nonce = uuid.uuid4().hex[:8]  # actor names stay unique across controllers
    starts = [
        start_executor(cfg, c, f"distserve-{r}-{i}-{nonce}", use_ray, tp, pp)
        for i, ((r, tp, pp), c, cfg) in enumerate(zip(groups, cores, configs, strict=True))
    ]
    executors = [e for slots in await asyncio.gather(*starts) for e in slots]
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(e.info() for e in executors))
    except asyncio.TimeoutError:
        await asyncio.gather(*(e.close() for e in executors), return_exceptions=True)
        raise TimeoutError(
            f"workers did not start within {timeout:.0f} s: the cluster may lack the resources "
            f"for {len(roles)} instances ({placement.cores_per_instance or 'shared'} cores each)"
        ) from None
    return executors


def group_cores(placement: PlacementConfig, device: str) -> list[list[int]]:
    """The CPU cores of each instance (`placement.groups` order), listed worker by worker:
    an instance gets `cores_per_instance` cores (or an even share of the machine per
    worker), split among its tp x pp workers, each at least one core."""
    groups = placement.groups
    if device != "cpu":
        return [[] for _ in groups]
    cores = available_cores()
    sizes = [tp * pp for _, tp, pp in groups]
    cpi = placement.cores_per_instance
    per_worker = [max(1, cpi // n) if cpi else max(1, len(cores) // sum(sizes)) for n in sizes]
    needed = sum(k * n for k, n in zip(per_worker, sizes, strict=True))
    if needed > len(cores):
        log.warning(
            "%d workers of %d instances need %d cores; oversubscribing the %d usable cores",
            sum(sizes), len(groups), needed, len(cores),
        )  # fmt: skip
    out, i = [], 0
    for k, n in zip(per_worker, sizes, strict=True):
        out.append([cores[(i + j) % len(cores)] for j in range(k * n)])
        i += k * n
    return out


def instance_cores(placement: PlacementConfig, device: str) -> list[list[int]]:
    """The cores of each instance in `placement.roles` order (a pipeline's slots share
    its workers' cores)."""
    cores = group_cores(placement, device)
    return [c for (_, _, pp), c in zip(placement.groups, cores, strict=True) for _ in range(pp)]


async def start_executor(
    cfg: EngineConfig, cores: list[int], name: str, use_ray: bool, tp: int = 1, pp: int = 1
) -> list[Executor]:
    """Start one instance's worker(s): its executors, one per pipeline slot."""
    if tp * pp > 1:
        return list(await ParallelExecutor.start(cfg, cores, name, use_ray, tp, pp))
    if use_ray:
        return [await RayExecutor.start(cfg, cores or None, name)]
    return [await LocalExecutor.start(cfg, None)]


async def connect_peers(
    executors: list[Executor],
    roles: list[str],
    infos: list[WorkerInfo],
    shared_memory: bool,
    required: bool = False,
) -> None:
    """Let every decode worker map the caches of the prefill workers on its node (when
    `shared_memory`), then remove the cache files' names so nothing is left in /dev/shm
    whatever happens to the processes later. With `required`, raise ValueError if some
    decode worker could not map some prefill worker's cache (other node, or no file)."""
    pairs: list[tuple[RayExecutor, RayExecutor, WorkerInfo]] = []
    problems = []
    for dst, role, dinfo in zip(executors, roles, infos, strict=True):
        for src, srole, sinfo in zip(executors, roles, infos, strict=True):
            if not shared_memory or role != "decode" or srole != "prefill":
                continue
            if (
                isinstance(dst, RayExecutor)
                and isinstance(src, RayExecutor)
                and sinfo.node == dinfo.node
                and sinfo.shm_path is not None
            ):
                pairs.append((dst, src, sinfo))
            else:
                problems.append(f"{srole} on {sinfo.node} -> {role} on {dinfo.node}")
    try:
        if required and problems:
            raise ValueError(
                "transport 'shm' needs prefill and decode workers as Ray actors on one node "
                f"with a /dev/shm cache; these pairs are not: {', '.join(problems)}"
            )
        await asyncio.gather(*(dst.attach_peer(src, sinfo) for dst, src, sinfo in pairs))
    finally:
        ray_executors = [e for e in executors if isinstance(e, RayExecutor)]
        await asyncio.gather(*(e.unlink_shared() for e in ray_executors))


async def restart_worker(
    engine: EngineConfig,
    placement: PlacementConfig,
    role: str,
    cores: list[int],
    use_ray: bool,
    timeout: float,
    previous: Executor | None = None,
) -> tuple[Executor, WorkerInfo]:
    """Start one worker again (after its predecessor died), with the same role and cores
    (an emulated one on the same emulated device as `previous`)."""
    cfg = role_engine_config(engine, placement, role)
    tp, pp = placement.shape(role)
    if isinstance(previous, EmulatedExecutor):
        executor: Executor = previous.restarted()
    elif isinstance(previous, ParallelExecutor):  # the whole instance, once for its slots
        name = f"distserve-{role}-restart-{uuid.uuid4().hex[:8]}"
        executor = await previous.group.restarted_slot(
            previous.slot, lambda: ParallelExecutor.start(cfg, cores, name, use_ray, tp, pp)
        )
    elif use_ray:
        executor = await RayExecutor.start(
            cfg, cores or None, f"distserve-{role}-restart-{uuid.uuid4().hex[:8]}"
        )
    else:
        executor = await LocalExecutor.start(cfg, None)
    try:
        async with asyncio.timeout(timeout):
            info = await executor.info()
    except BaseException:
        await executor.close()
        raise
    return executor, info


async def connect_restarted(
    executor: Executor, info: WorkerInfo, role: str, decoders: list[Executor], shared_memory: bool
) -> None:
    """A restarted prefill worker's cache is mapped by the live decode workers on its
    node; a restarted decode worker cannot map older prefill caches (their names are gone)
    and pulls from them through the object store. Then the new name is removed."""
    try:
        if (
            shared_memory
            and role == "prefill"
            and isinstance(executor, RayExecutor)
            and info.shm_path
        ):
            attach = [d.attach_peer(executor, info) for d in decoders if isinstance(d, RayExecutor)]
            await asyncio.gather(*attach, return_exceptions=True)  # other nodes: object store
    finally:
        if isinstance(executor, RayExecutor):
            await executor.unlink_shared()


async def replace_worker(
    engine: EngineConfig,
    placement: PlacementConfig,
    role: str,
    cores: list[int],
    use_ray: bool,
    timeout: float,
    previous: Executor,
    decoders: list[Executor],
    shared_memory: bool,
) -> tuple[Executor, WorkerInfo]:
    """A started and connected worker in place of `previous` (restart_worker, then
    connect_restarted); one that fails to connect is closed, so retries leak no actors."""
    executor, info = await restart_worker(
        engine, placement, role, cores, use_ray, timeout, previous
    )
    try:
        await connect_restarted(executor, info, role, decoders, shared_memory)
    except BaseException:
        await executor.close()
        raise
    return executor, info
