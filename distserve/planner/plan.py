"""Plans: the search's answer as a JSON file that `distserve serve --plan` deploys."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import Any

from distserve.planner.jobs import score, worker_pool
from distserve.planner.low_affinity import algorithm2
from distserve.planner.phases import InstanceConfig, Setting, placement_attainment
from distserve.planner.search import (
    Choice,
    Cluster,
    algorithm1_batch,
    algorithm1_choices,
    baseline_batch,
    baseline_choice,
    candidates,
)
from distserve.planner.verify import verify, verify_candidates
from distserve.sim.profile import Profile


def _shape(inst: InstanceConfig | None, count: int) -> dict[str, Any] | None:
    if inst is None:
        return None
    p = inst.profile
    return {
        "tp": p.tp,
        "pp": inst.pp,
        "cores": p.cores,
        "instances": count,
        "devices_per_instance": inst.devices,
        "profile": {"model": p.model, "hardware": p.hardware, "source": p.source},
    }


def choice_dict(c: Choice | None) -> dict[str, Any] | None:
    if c is None:
        return None
    d: dict[str, Any] = {
        "mode": c.mode,
        "devices": c.devices,
        "goodput": c.goodput,
        "per_device_goodput": c.per_device,
    }
    if c.colocated is not None:
        d |= {"colocated": _shape(c.colocated, c.num_colocated), "chunked_prefill": c.chunked}
    else:
        d |= {"prefill": _shape(c.prefill, c.num_prefill), "decode": _shape(c.decode, c.num_decode)}
    return d


def layout_text(c: dict[str, Any] | None) -> str:
    """A plan's layout (`choice_dict`) in short: '1 x P tp2 pp4 + 1 x D tp3 pp2', '5 x tp3 pp2'."""
    if not c:
        return "none"
    if c.get("colocated"):
        s = c["colocated"]
        return f"{s['instances']} x tp{s['tp']} pp{s['pp']}"
    p, d = c["prefill"], c["decode"]
    return (
        f"{p['instances']} x P tp{p['tp']} pp{p['pp']} + {d['instances']} x D tp{d['tp']} "
        f"pp{d['pp']}"
    )


def choice_from_dict(d: dict[str, Any], profiles: Sequence[Profile]) -> Choice:
    """The placement of a plan's layout (`choice_dict`'s output), on the profiles that
    match its shapes (model, tp, cores)."""

    def inst(shape: dict[str, Any]) -> InstanceConfig:
        for p in profiles:
            if (p.model, p.tp, p.cores) == (
                shape["profile"]["model"],
                shape["tp"],
                shape["cores"],
            ):
                return InstanceConfig(p, shape["pp"])
        raise ValueError(
            f"no profile of {shape['profile']['model']} at tp{shape['tp']} / "
            f"{shape['cores']} core(s) among those given"
        )

    if d.get("colocated"):
        shape = d["colocated"]
        return Choice(
            "colocated",
            colocated=inst(shape),
            num_colocated=shape["instances"],
            chunked=bool(d.get("chunked_prefill")),
            goodput=d["goodput"],
        )
    return Choice(
        "disagg",
        prefill=inst(d["prefill"]),
        decode=inst(d["decode"]),
        num_prefill=d["prefill"]["instances"],
        num_decode=d["decode"]["instances"],
        goodput=d["goodput"],
    )


def attainment_curve(setting: Setting, c: Choice, rates: Sequence[float]) -> list[float]:
    """The whole placement's simulated attainment (both targets) at each rate: what a
    deployment measured at those rates is compared with."""
    if c.colocated is not None:
        attain = placement_attainment(
            setting,
            None,
            None,
            colocated=c.colocated,
            num_colocated=c.num_colocated,
            chunked=c.chunked,
            exact=True,
        )
    else:
        attain = placement_attainment(
            setting,
            c.prefill,
            c.decode,
            num_prefill=c.num_prefill,
            num_decode=c.num_decode,
            exact=True,
        )
    if attain is None:
        return [0.0 for _ in rates]
    return [attain(r) for r in rates]


def make_plan(
    setting: Setting,
    profiles: Sequence[Profile],
    decode_profiles: Sequence[Profile] | None,
    cluster: Cluster,
    affinity: str = "high",
    rate: float | None = None,
    workers: int = 2,
    progress: Callable[[str], None] | None = None,
    workload_meta: dict[str, Any] | None = None,
    baseline_profiles: Sequence[Profile] | None = None,
    max_pp: int | None = None,
    baseline_setting: Setting | None = None,
    chunked_setting: Setting | None = None,
) -> dict[str, Any]:
    """Search, verify the winners jointly, and compare with the colocated baselines.
    `baseline_profiles`: the baselines' own engine (e.g. vLLM's A100 coefficients, as the
    paper compares against); default: the same profiles as the disaggregated search.
    `baseline_setting`: the baselines' own serving path (scales and overhead calibrated on
    a colocated server; the workload and SLO must be the same); default: `setting`.
    `chunked_setting`: the chunked-prefill baseline's own (calibrated on a chunked server:
    nearly all its steps carry decode tokens, so its neighbour's contention differs);
    default: `baseline_setting`.
    `max_pp`: the highest pipeline degree of any instance (default: what the cluster holds)."""
    bsetting = baseline_setting or setting
    csetting = chunked_setting or bsetting
    for label, s in (("baseline_setting", bsetting), ("chunked_setting", csetting)):
        if (s.workload, s.ttft_slo, s.tpot_slo, s.target) != (
            setting.workload,
            setting.ttft_slo,
            setting.tpot_slo,
            setting.target,
        ):
            raise ValueError(f"{label} must have the same workload, SLO and target")
    t0 = time.perf_counter()
    shapes = candidates(profiles, cluster, max_pp)
    dshapes = candidates(decode_profiles, cluster, max_pp) if decode_profiles else shapes
    bshapes = candidates(baseline_profiles, cluster, max_pp) if baseline_profiles else shapes
    if not shapes or not dshapes or not bshapes:
        raise ValueError(
            "no instance shape fits the cluster (check --devices-per-node and the "
            "profile's tp / cores)"
        )
    if affinity not in ("high", "low"):
        raise ValueError(f"affinity must be high or low, got {affinity!r}")
    bases = [baseline_batch(bsetting, bshapes, False), baseline_batch(csetting, bshapes, True)]
    names = ("colocated", "chunked")
    chosen: dict[str, tuple[Choice | None, dict[str, float]]] = {}
    verifying: dict[str, Future[float]] = {}
    candidates_verified: list[Future[list[tuple[float, float]]]] = []
    # one pool for the whole plan: the search's and the baselines' jobs share it
    with worker_pool(workers) as pool:

        def baseline_scored(k: int) -> None:
            """A baseline's pick, verified on the pool at once, beside the search's tail."""
            chosen[names[k]] = baseline_choice(bases[k], cluster, rate)
            c = chosen[names[k]][0]
            if pool is not None and c is not None:
                verifying[names[k]] = pool.submit(verify, bases[k].setting, c)

        if affinity == "low":
            dprofiles = decode_profiles or profiles
            disagg, table = algorithm2(
                setting, profiles, dprofiles, cluster, rate, workers, progress, max_pp, pool
            )
            t_search = time.perf_counter() - t0
            score(bases, pool, workers, progress, baseline_scored)
        else:
            search = algorithm1_batch(setting, shapes, dshapes, cluster, rate)
            picked: list[tuple[list[Choice], dict[str, Any]]] = []

            def search_scored() -> None:
                """The search's best combinations, verified on the pool at once, beside the
                baselines' remaining jobs (verifications are the plan's longest jobs)."""
                top = VERIFY_TOP if rate is None else 1  # a target rate: its fewest devices
                picked.append(algorithm1_choices(search, cluster, rate, top))
                if pool is not None and picked[0][0]:
                    candidates_verified.append(
                        pool.submit(verify_candidates, setting, picked[0][0])
                    )

            # the search first: the baselines' jobs fill the workers it leaves idle, and
            # its verification starts while they run
            score(
                [search, *bases],
                pool,
                workers,
                progress,
                lambda k: baseline_scored(k - 1) if k else search_scored(),
                first=True,
            )
            search_choices, table = picked[0]
            t_search = search.seconds
        t_scored = time.perf_counter() - t0
        (colo, colo_table), (chunk, chunk_table) = chosen["colocated"], chosen["chunked"]
        if affinity == "low":
            search_choices = [] if disagg is None else [disagg]
        if not candidates_verified and pool is not None and search_choices:
            candidates_verified.append(pool.submit(verify_candidates, setting, search_choices))
        picks: dict[str, tuple[Setting, Choice | None]] = {
            "colocated": (bsetting, colo),
            "chunked": (csetting, chunk),
        }
        estimates = _verify(picks, pool, progress, verifying)
        # Algorithm 1 ranks combinations by their phases simulated apart; the best of those
        # can verify far lower than the next (13B x 8: 22.1 req/s by its phases, 11.6
        # jointly, where another verified at 23.7): keep the best verified
        found = (
            candidates_verified[0].result()
            if candidates_verified
            else verify_candidates(setting, search_choices)
        )
        candidates_seen: list[dict[str, Any]] = []
        phase_goodputs = [c.goodput for c in search_choices]
        for i, (c, (g, floor)) in enumerate(zip(search_choices, found, strict=True)):
            seen = {"layout": layout_text(choice_dict(c)), "estimate": c.goodput}
            c.goodput = g
            if g > 0 or not floor:
                seen |= {"verified": g, "per_device": c.per_device}
            else:
                seen |= {"verified_below": floor, "per_device_below": floor / c.devices}
            candidates_seen.append(seen)
            if progress:
                what = (
                    f"{g:.3f} req/s on {c.devices} devices ({c.per_device:.3f} per device)"
                    if "verified" in seen
                    else f"below {floor:.3f} req/s on {c.devices} devices, stopped: another "
                    "verified better per device"
                )
                progress(f"verified {_candidate(i)}: {what}")
        disagg = None
        if search_choices:
            best_i = max(range(len(search_choices)), key=lambda i: search_choices[i].per_device)
            disagg = search_choices[best_i]
            estimates["disagg"] = phase_goodputs[best_i]
    options = {
        k: v
        for k, v in (("disagg", disagg), ("colocated", colo), ("chunked", chunk))
        if v is not None and v.goodput > 0
    }
    if not options:
        raise ValueError("no layout meets the SLO at any rate: loosen the targets or add devices")
    best_name = max(options, key=lambda k: options[k].per_device)
    best = options[best_name]
    baselines = {k: v for k, v in options.items() if k != "disagg"}
    best_base = max((v.per_device for v in baselines.values()), default=0.0)
    plan = {
        "model": profiles[0].model,
        "cluster": {
            "num_nodes": cluster.num_nodes,
            "devices_per_node": cluster.devices_per_node,
            "kind": cluster.kind,
        },
        "recommended": best_name,
        "placement": choice_dict(best),
        "disagg": choice_dict(disagg),
        "baselines": {k: choice_dict(v) for k, v in (("colocated", colo), ("chunked", chunk))},
        "disagg_gain_over_best_colocated": (disagg.per_device / best_base)
        if disagg and best_base
        else None,
        "slo": {"ttft": setting.ttft_slo, "tpot": setting.tpot_slo, "attainment": setting.target},
        "affinity": affinity,
        "serving_path": setting.path.to_dict()
        | ({"baselines": bsetting.path.to_dict()} if baseline_setting else {})
        | ({"chunked": csetting.path.to_dict()} if chunked_setting else {}),
        "baseline_profiles": sorted({p.source for p in (baseline_profiles or profiles)}),
        "target_rate": rate,
        "workload": workload_meta or {},
        "phase_goodputs": {
            "search": table,
            "colocated": colo_table,
            "chunked": chunk_table,
            "before_verification": estimates,
            "disagg_candidates": candidates_seen,
        },
        "search_seconds": time.perf_counter() - t0,
        # jobs share the pool: the algorithm's time is when its last job ended, the
        # baselines' what scoring took after that (its verification overlaps them)
        "seconds_by_phase": {
            "algorithm": t_search,
            "baselines": max(0.0, t_scored - t_search),
            "verification": time.perf_counter() - t0 - t_scored,
        },
    }
    if best_name != "disagg" and disagg is not None and disagg.per_device > 0:
        ratio = best.per_device / disagg.per_device
        plan["note"] = (
            f"colocated layout '{best_name}' beats the best disaggregated one by {ratio:.2f}x "
            "per device for this workload and SLO"
        )
    # Layouts within the search's tolerance of the best are a tie, not a ranking: on the
    # CPU, colocated and chunked verified at the same goodput and measured 1.65x apart.
    ties = tied_with({k: v.per_device for k, v in options.items()}, best_name)
    if ties:
        plan["ties"] = ties
        tie = (
            f"{', '.join(ties)} within {100 * TIE:.0f}% of '{best_name}': a tie for the "
            "simulator, measure both"
        )
        plan["note"] = f"{plan['note']}; {tie}" if "note" in plan else tie
    return plan


def _verify(
    picks: dict[str, tuple[Setting, Choice | None]],
    pool: Executor | None,
    progress: Callable[[str], None] | None,
    started: dict[str, Future[float]] | None = None,
) -> dict[str, float]:
    """Verify each pick on its own setting, in parallel where a pool is given; its goodput
    becomes the verified one. `started`: verifications already under way on the pool.
    Returns the goodputs before verification."""
    live = {name: (s, c) for name, (s, c) in picks.items() if c is not None}
    if pool is None:
        got = {name: verify(s, c) for name, (s, c) in live.items()}
    else:
        futures = dict(started or {})
        for name, (s, c) in live.items():
            if name not in futures:
                futures[name] = pool.submit(verify, s, c)
        got = {name: futures[name].result() for name in live}
    estimates = {}
    for name, (_, c) in live.items():
        estimates[name], c.goodput = c.goodput, got[name]
        if progress:
            progress(
                f"verified {name}: {c.goodput:.3f} req/s on {c.devices} devices "
                f"({c.per_device:.3f} per device)"
            )
    return estimates


VERIFY_TOP = 3
"""Algorithm 1's best combinations (by their phases' goodputs) verified jointly; the best
verified one is the plan's disaggregated layout."""


def _candidate(i: int) -> str:
    """The verification name of Algorithm 1's i-th best combination."""
    return "disagg" if i == 0 else f"disagg #{i + 1}"


TIE = 0.05
"""Relative goodput within which two layouts are reported as a tie (bisection's tolerance)."""


def tied_with(per_device: dict[str, float], best: str) -> list[str]:
    """The layouts other than `best` whose per-device goodput is within TIE of it."""
    return [k for k, v in per_device.items() if k != best and v >= (1 - TIE) * per_device[best]]


def write_plan(path: str, plan: dict[str, Any]) -> None:
    """Write the plan as JSON to `path`, making its directory if missing."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(plan, f, indent=1, default=str)


def read_plan(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        plan = json.load(f)
    if "placement" not in plan or not isinstance(plan["placement"], dict):
        raise ValueError(f"{path} is not a distserve plan (no 'placement')")
    return plan  # type: ignore[no-any-return]
