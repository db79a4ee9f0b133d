"""The simulator: fits, hand-checked small cases, determinism, fast-forward equality, and
the same scheduling decisions as a real instance."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from distserve.config import PlacementConfig
from distserve.core import SchedulerConfig
from distserve.core.plan import ScheduledChunk, StepPlan
from distserve.planner.fit import fit_decode, fit_prefill
from distserve.sim.latency import LatencyModel
from distserve.sim.profile import Profile, bundled_a100, find
from distserve.sim.run import SimOptions, sim_config, simulate
from distserve.sim.serving_path import ServingPath
from distserve.sim.simulator import SimConfig, Simulator
from distserve.workload import Workload, WorkloadRequest
from distserve.workload.build import WorkloadSpec, build_workload

# Round numbers: prefill 10 ms + 1 ms/token; decode 5 ms + 0 per token + 1 ms/request.
ROUND = Profile(
    "toy",
    "toy",
    prefill=(0.010, 0.001, 0.0),
    decode_small=(0.005, 0.0, 0.001),
    decode_large=(0.005, 0.0, 0.001),
    kv_capacity_tokens=16 * 64,
)


def _wl(*reqs: tuple[float, int, int]) -> Workload:
    """Requests (arrival, prompt length, output length) whose prompts share no prefix."""
    return Workload(
        tuple(
            WorkloadRequest(i, t, tuple((i + j) % 300 + 1 for j in range(p)), o)
            for i, (t, p, o) in enumerate(reqs)
        )
    )


def _config(mode: str = "disagg", bandwidth: float = 1e6, **kw) -> SimConfig:
    placement = PlacementConfig(mode=mode, **kw)
    lat = LatencyModel(ROUND, ServingPath(transfer_bandwidth=bandwidth), kv_bytes_per_token=1000)
    roles = {"prefill", "decode", "colocated"}
    return SimConfig(
        placement,
        {r: lat for r in roles},
        {r: 64 for r in roles},
        SchedulerConfig(
            max_num_seqs=8,
            max_num_batched_tokens=512,
            max_model_len=512,
            chunked_prefill=kw.get("chunked_prefill", False),
        ),
    )


def test_fit_recovers_known_coefficients() -> None:
    rng = np.random.default_rng(0)
    pre = [
        [int(n)] * int(b)
        for n, b in zip(rng.integers(16, 2048, 40), rng.integers(1, 4, 40), strict=True)
    ]
    a, b, c = 0.02, 1.5e-4, 3e-8
    coef, err = fit_prefill(pre, [a + b * sum(x) + c * sum(n * n for n in x) for x in pre])
    assert coef == pytest.approx((a, b, c), rel=1e-6) and err.max() < 1e-9
    dec = [[int(ctx)] * int(bs) for bs in (1, 2, 4, 8, 16, 32, 64) for ctx in (64, 256, 1024)]
    small, large = (0.01, 2e-6, 1e-3), (0.03, 1e-6, 4e-4)

    def t(x: list[int]) -> float:
        p = small if len(x) < 16 else large
        return p[0] + p[1] * sum(n + 1 for n in x) + p[2] * len(x)

    s, l, thr, err = fit_decode(dec, [t(x) for x in dec])
    assert thr == 16 and err.max() < 1e-6
    assert s == pytest.approx(small, rel=1e-4) and l == pytest.approx(large, rel=1e-4)
    # a known threshold (where the runner leaves its kernels) is taken as given...
    assert fit_decode(dec, [t(x) for x in dec], threshold=8)[2] == 8
    # ...unless it leaves fewer than 3 samples on a side
    assert fit_decode(dec, [t(x) for x in dec], threshold=1)[2] == 16


def test_one_request_prefill_transfer_decode_by_hand() -> None:
    # 100-token prompt, 5 output tokens; transfer of 100 tokens x 1000 B at 1 MB/s = 0.1 s.
    (r,) = Simulator(_config()).run(_wl((0.0, 100, 5)))
    prefill = 0.010 + 0.001 * 100
    decode_step = 0.005 + 0.001  # one request, no per-token term
    assert r.ttft == pytest.approx(prefill)
    assert r.server["migration_end"] - r.server["migration_start"] == pytest.approx(0.1)
    assert r.e2e == pytest.approx(prefill + 0.1 + 4 * decode_step)
    assert r.tpot == pytest.approx((0.1 + 4 * decode_step) / 4)
    assert r.num_tokens == 5


@pytest.mark.parametrize("prefill_scale,decode_scale", [(1.5, None), (1.2, 1.5)])
def test_scales_stretch_model_time_not_overhead(prefill_scale, decode_scale) -> None:
    """A serving path that runs the model slower than profiled (decode 1.5x, prefill the
    same or 1.2x), plus 2 ms a step."""
    path = ServingPath(step_overhead=0.002, compute_scale=prefill_scale, decode_scale=decode_scale)
    lat = LatencyModel(ROUND, path)
    roles = ("prefill", "decode", "colocated")
    cfg = dataclasses.replace(_config(), latency={r: lat for r in roles})
    (r,) = Simulator(cfg).run(_wl((0.0, 100, 5)))
    assert r.ttft == pytest.approx(prefill_scale * (0.010 + 0.001 * 100) + 0.002)
    step = 1.5 * (0.005 + 0.001) + 0.002
    # transfer: no bandwidth cost given here (kv_bytes_per_token 0)
    assert r.e2e == pytest.approx(r.ttft + 4 * step)
    assert lat.decode_steps_time([100], 4) == pytest.approx(4 * step)


def test_mixed_step_scales_each_part() -> None:
    """A chunked-prefill step: 100 prompt tokens and two decodes pay one fixed term."""
    lat = LatencyModel(ROUND, ServingPath(step_overhead=0.002, compute_scale=1.2, decode_scale=1.5))
    chunk = lambda start, n: ScheduledChunk("r", (), start, (), None, num_tokens=n)  # noqa: E731
    plan = StepPlan(0, (chunk(0, 100), chunk(50, 1), chunk(60, 1)))
    prefill = 0.010 + 0.001 * 100
    decode = 0.005 + 2 * 0.001 - 0.005  # the shared fixed term paid once
    assert lat.step_time(plan) == pytest.approx(1.2 * prefill + 1.5 * decode + 0.002)


def test_two_requests_queue_for_prefill() -> None:
    # The second arrives while the first is prefilling: it waits, then prefills alone.
    a, b = Simulator(_config()).run(_wl((0.0, 100, 2), (0.05, 50, 2)))
    assert a.ttft == pytest.approx(0.11)
    assert b.server["prefill_start"] == pytest.approx(0.11 - 0.05)
    assert b.ttft == pytest.approx(0.06 + 0.010 + 0.050)


def test_a_repeated_prompt_prefills_and_migrates_only_what_is_not_cached() -> None:
    # r1: 100 tokens, cold. r2, the same prompt after r1 finished: 96 tokens (6 full
    # blocks) cached on the prefill side, so it computes 4 (10 ms + 4 ms); the decode side
    # holds them too, so 4 tokens move (4 x 1000 B at 1 MB/s = 4 ms) instead of 100.
    wl = _wl((0.0, 100, 3), (1.0, 100, 3))
    same = dataclasses.replace(wl.requests[1], prompt_token_ids=wl.requests[0].prompt_token_ids)
    wl = Workload((wl.requests[0], same))
    r1, r2 = Simulator(_config()).run(wl)
    assert r1.ttft == pytest.approx(0.110) and r2.ttft == pytest.approx(0.014)
    migration = [r.server["migration_end"] - r.server["migration_start"] for r in (r1, r2)]
    assert migration == pytest.approx([0.1, 0.004])
    off = dataclasses.replace(_config(), prefix_caching=False)
    assert [r.ttft for r in Simulator(off).run(wl)] == pytest.approx([0.110, 0.110])


def test_contention_slows_a_step_while_the_other_instance_decodes() -> None:
    """Two colocated instances. Two prompts at t=0: each starts while the other is idle or
    computing a prompt (scale 1). A prompt at t=0.2 while the first instance decodes runs
    at the contended prefill scale (2): contention counts the others' decode steps."""
    path = ServingPath(compute_scale=1.0, contended_scale=2.0, contended_decode_scale=3.0)
    lat = LatencyModel(ROUND, path)
    cfg = dataclasses.replace(_config("colocated", num_instances=2), latency={"colocated": lat})
    a, b = Simulator(cfg).run(_wl((0.0, 100, 1), (0.0, 100, 1)))
    assert a.ttft == pytest.approx(0.11) and b.ttft == pytest.approx(0.11)
    a, b = Simulator(cfg).run(_wl((0.0, 100, 50), (0.2, 100, 1)))
    assert a.ttft == pytest.approx(0.11)
    assert b.ttft == pytest.approx(2 * 0.11)
    # without contention the late prompt takes the profile's time
    plain = dataclasses.replace(cfg, latency={"colocated": LatencyModel(ROUND)})
    assert Simulator(plain).run(_wl((0.0, 100, 50), (0.2, 100, 1)))[1].ttft == pytest.approx(0.11)
    # decode: halfway between idle (1) and contended (3) scales with half the others busy
    assert lat.decode_steps_time([10], 1, busy_share=0.5) == pytest.approx(2 * 0.006)


@pytest.mark.parametrize(
    "mode,kw,contended",
    [
        ("disagg", {}, False),
        ("disagg", {"num_prefill": 2, "num_decode": 2}, False),
        ("colocated", {}, False),
        ("colocated", {"chunked_prefill": True}, False),
        ("disagg", {}, True),
        ("colocated", {"num_instances": 3}, True),
        # spans that run past other instances' events, cut when work comes for theirs;
        # the disaggregated ones admit handoffs inside spans, some waiting for blocks
        ("colocated", {"num_instances": 3}, False),
        ("colocated", {"num_instances": 2, "chunked_prefill": True}, False),
        ("disagg", {"num_prefill": 1, "num_decode": 3}, False),
    ],
)
def test_fast_forward_changes_nothing(mode: str, kw: dict, contended: bool) -> None:
    profile = find(bundled_a100(), "opt-13b", 1)
    spec = WorkloadSpec(
        dataset="random",
        num_requests=300,
        rate=6.0,
        seed=3,
        prompt_len=(16, 900),
        output_len=(1, 300),
    )
    wl = build_workload(spec, tokenizer=None)  # type: ignore[arg-type]
    placement = PlacementConfig(mode=mode, **kw)
    sched = SchedulerConfig(
        max_num_seqs=32,
        max_num_batched_tokens=1024 if kw.get("chunked_prefill") else 2048,
        chunked_prefill=kw.get("chunked_prefill", False),
    )
    path = (
        ServingPath(contended_scale=1.3, contended_decode_scale=1.6) if contended else ServingPath()
    )
    base = sim_config(
        placement, profile, None, SimOptions(path, num_blocks=400, scheduler=sched)
    )  # few blocks: preemptions too
    fast = Simulator(base).run(wl)
    slow = Simulator(dataclasses.replace(base, fast_forward=False)).run(wl)
    # Same events, same decisions; times equal up to float summation order.
    for f, s in zip(fast, slow, strict=True):
        assert (f.num_tokens, f.error, sorted(f.server)) == (
            s.num_tokens,
            s.error,
            sorted(s.server),
        )
        assert (f.ttft, f.tpot, f.e2e) == pytest.approx(
            (s.ttft, s.tpot, s.e2e), rel=1e-9, abs=1e-12
        )
        assert f.server == pytest.approx(s.server, rel=1e-9, abs=1e-12)


def _shared_prefix_workload(share: bool) -> Workload:
    """300 random requests; with `share`, each prompt starts with one of three 256-token
    texts (as chat turns repeat a system prompt or a conversation)."""
    spec = WorkloadSpec(dataset="random", num_requests=300, rate=6.0, seed=5, prompt_len=(16, 600))
    wl = build_workload(spec, tokenizer=None)  # type: ignore[arg-type]
    if not share:
        return wl
    texts = [tuple(range(7 + k, 263 + k)) for k in (0, 300, 600)]
    reqs = [
        dataclasses.replace(r, prompt_token_ids=texts[r.index % 3] + r.prompt_token_ids)
        for r in wl.requests
    ]
    return Workload(tuple(reqs))


@pytest.mark.parametrize("mode", ["disagg", "colocated"])
def test_prefix_caching_changes_nothing_without_shared_prefixes(mode: str) -> None:
    profile = find(bundled_a100(), "opt-13b", 1)
    opts = SimOptions(num_blocks=400)  # few blocks: preemptions too
    on = sim_config(PlacementConfig(mode=mode), profile, None, opts)
    off = dataclasses.replace(on, prefix_caching=False)
    wl = _shared_prefix_workload(share=False)
    assert Simulator(on).run(wl) == Simulator(off).run(wl)
    shared = _shared_prefix_workload(share=True)
    hot, cold = Simulator(on), Simulator(off)
    hot_results, cold_results = hot.run(shared), cold.run(shared)
    assert sum(i.scheduler.num_prompt_tokens_cached for i in hot.instances) > 200 * 256
    assert sum(r.ttft for r in hot_results) < sum(r.ttft for r in cold_results)  # type: ignore[misc]


@pytest.mark.parametrize(
    "placement",
    [
        PlacementConfig(mode="colocated"),
        PlacementConfig(mode="colocated", num_instances=3),
        PlacementConfig(mode="disagg", num_prefill=2, num_decode=2),
    ],
)
def test_fast_forward_changes_nothing_with_shared_prefixes(placement: PlacementConfig) -> None:
    """A span names the blocks it fills, and takes (evicting cached prefixes) the blocks
    its steps need, as its steps one by one would: where routing weighs instances by
    their cached prefixes while others are inside spans too."""
    profile = find(bundled_a100(), "opt-13b", 1)
    sched = SchedulerConfig(max_num_seqs=32)
    base = sim_config(placement, profile, None, SimOptions(num_blocks=400, scheduler=sched))
    wl = _shared_prefix_workload(share=True)
    fast = Simulator(base)
    slow = Simulator(dataclasses.replace(base, fast_forward=False))
    for f, s in zip(fast.run(wl), slow.run(wl), strict=True):
        assert (f.num_tokens, f.ttft, f.e2e) == pytest.approx((s.num_tokens, s.ttft, s.e2e))
    hits = [[i.scheduler.num_prompt_tokens_cached for i in sim.instances] for sim in (fast, slow)]
    assert hits[0] == hits[1] and sum(hits[0]) > 0
    assert [i.steps for i in fast.instances] == [i.steps for i in slow.instances]


def test_same_seed_same_result(tmp_path) -> None:
    profile = find(bundled_a100(), "opt-13b", 1)
    spec = WorkloadSpec(dataset="random", num_requests=200, rate=4.0, seed=11)
    config = sim_config(PlacementConfig(mode="disagg"), profile, None, SimOptions())
    outs = []
    for i in range(2):
        path = tmp_path / f"r{i}.json"
        simulate(config, build_workload(spec, tokenizer=None), 0.25, 0.1, str(path))  # type: ignore[arg-type]
        d = json.loads(path.read_text())
        d["summary"].pop("simulator")
        outs.append((d["summary"], d["requests"]))
    assert outs[0] == outs[1]


def test_step_noise_is_seeded_and_keeps_the_mean() -> None:
    """Step noise: the same seed gives the same result, another seed another; a lone
    request's decode steps stretch by a mean-one factor (over 400 steps the total stays
    within 3% of the noiseless one), and sigma 0 is the deterministic simulator."""
    profile = find(bundled_a100(), "opt-13b", 1)
    wl = _wl((0.0, 100, 400))
    base = sim_config(
        PlacementConfig(mode="colocated", num_instances=1), profile, None, SimOptions()
    )
    e2e = {}
    for name, noise, seed in (("off", 0.0, 0), ("a", 0.2, 1), ("a2", 0.2, 1), ("b", 0.2, 2)):
        cfg = dataclasses.replace(base, step_noise=noise, seed=seed)
        (res,) = Simulator(cfg).run(wl)
        e2e[name] = res.e2e
    assert e2e["off"] == Simulator(base).run(wl)[0].e2e
    assert e2e["a"] == e2e["a2"] != e2e["b"]
    assert e2e["a"] != e2e["off"]
    assert abs(e2e["a"] / e2e["off"] - 1) < 0.03 and abs(e2e["b"] / e2e["off"] - 1) < 0.03


@pytest.mark.parametrize("shared", [False, True], ids=["distinct", "shared-prefixes"])
def test_simulated_and_real_instance_schedule_alike(make_engine, tmp_path, shared) -> None:
    """A real colocated instance (real model, real runner) and a simulated one, given the
    same requests at once and the same limits, produce the same sequence of plans: which
    requests, which token ranges, which preemptions and swaps. With prompts that share
    prefixes, both take the same prefix-cache hits (chunks that start past 0)."""
    from distserve.config import EngineConfig
    from distserve.core import CacheConfig, SamplingParams
    from tests.model.hf_reference import tiny_hf_model

    tiny_hf_model("llama").save_pretrained(tmp_path)  # a real model, small enough to be quick
    lens = [(16, 150), (20, 120), (30, 100), (10, 140), (50, 60), (64, 9)]
    sched = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=256, max_model_len=256, preemption_mode="swap"
    )
    eng = make_engine(
        EngineConfig(
            model=str(tmp_path),
            dtype="float32",
            cache=CacheConfig(num_blocks=14, block_size=16, num_swap_blocks=32),
            scheduler=sched,
        )
    )
    wl = _wl(*[(0.0, p, o) for p, o in lens])
    if shared:  # prompt i is 1 .. len_i: each shares its first full blocks with the others
        wl = Workload(
            tuple(
                dataclasses.replace(r, prompt_token_ids=tuple(range(1, r.prompt_len + 1)))
                for r in wl.requests
            )
        )
    for r in wl.requests:
        eng.add_request(
            list(r.prompt_token_ids),
            SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True),
        )
    real_plans = []
    schedule = eng.scheduler.schedule

    def recording(now: float):  # type: ignore[no-untyped-def]
        plan = schedule(now)
        if not plan.empty:
            real_plans.append(plan)
        return plan

    eng.scheduler.schedule = recording  # type: ignore[method-assign]
    while eng.has_unfinished():
        eng.step()
    lat = LatencyModel(ROUND)
    roles = {"prefill", "decode", "colocated"}
    config = SimConfig(
        PlacementConfig(mode="colocated", num_instances=1),
        {r: lat for r in roles},
        {r: 14 for r in roles},
        sched,
        block_size=16,
        num_swap_blocks=32,
        fast_forward=False,
        record_plans=True,
    )
    sim = Simulator(config)
    sim.run(wl)

    def shape(plans, ids):  # type: ignore[no-untyped-def]
        return [
            (
                [
                    (ids(c.request_id), c.start, c.num_tokens, c.sampling_params is not None)
                    for c in p.chunks
                ],
                p.swap_out,
                p.swap_in,
            )
            for p in plans
        ]

    assert eng.scheduler.num_preemptions > 0  # the case is tight enough to exercise swapping
    assert shape(real_plans, lambda r: int(r.split("-")[1])) == shape(sim.instances[0].plans, int)
    hits = eng.scheduler.num_prompt_tokens_cached
    assert hits == sim.instances[0].scheduler.num_prompt_tokens_cached
    assert (hits > 0) == shared


def test_routing_skips_lookups_only_for_prompts_no_one_shares(monkeypatch) -> None:
    """Routing looks a prompt up on every instance; one whose first block no other
    request has (so no cache can hold it) is routed by load alone: the same choices,
    so the same results, as looking it up everywhere."""
    profile = find(bundled_a100(), "opt-13b", 1)
    wl = _shared_prefix_workload(share=True)
    # a third of the prompts keep their own start: these share nothing
    reqs = [
        dataclasses.replace(r, prompt_token_ids=r.prompt_token_ids[256:])
        if r.index % 3 == 0 and len(r.prompt_token_ids) > 256 + 16
        else r
        for r in wl.requests
    ]
    wl = Workload(tuple(reqs))
    placement = PlacementConfig(mode="colocated", num_instances=3)
    config = sim_config(placement, profile, None, SimOptions(num_blocks=400))
    quick = Simulator(config)
    alone = quick._unshared(wl)
    assert alone and all(r.index % 3 == 0 for r in wl.requests if r.index in alone)
    fast = quick.run(wl)
    monkeypatch.setattr(Simulator, "_unshared", lambda self, workload: set())
    full = Simulator(config)
    assert fast == full.run(wl)
    assert [i.steps for i in quick.instances] == [i.steps for i in full.instances]
