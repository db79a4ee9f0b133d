"""The per-request rule (core/routing.py's PrefillOnDecode): a decode instance prefills a
short prompt itself when the prefill queue, not decode, is what delays it; a long prompt,
whose prefill would stall the decode batch past the TPOT target, never."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from distserve.cli import build_parser
from distserve.cli.live_flags import decode_prefill_config
from distserve.cluster.decode_prefill import DecodePrefillConfig
from distserve.core import (
    BlockManager,
    ColocatedScheduler,
    DecodeScheduler,
    PrefillScheduler,
    Request,
    SamplingParams,
    Scheduler,
    StepResult,
)
from distserve.core import SchedulerConfig as Cfg
from distserve.core.routing import PrefillOnDecode, prefill_on_decode

TPOT = 0.1


class Linear:
    """A latency model: 1 ms per prompt token, 2 ms per step, 1 ms per decode; KV moves
    at 0.01 ms per token."""

    def phase_time(self, prefill: Sequence[tuple[int, int]], decode: Sequence[int]) -> float:
        return 0.002 + 0.001 * sum(n for _, n in prefill) + 0.001 * len(decode)

    def transfer_time(self, num_tokens: int) -> float:
        return 1e-5 * num_tokens


RULE = PrefillOnDecode(Linear(), Linear(), TPOT)


@dataclass
class Inst:
    scheduler: Scheduler
    alive: bool = True


def req(rid: str, n: int, max_tokens: int = 8) -> Request:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, list(range(1, n + 1)), params, 0.0)


def prefill(blocks: int = 512) -> Inst:
    return Inst(PrefillScheduler(Cfg(max_model_len=1024), BlockManager(blocks, 16)))


def decode(blocks: int = 512, max_num_seqs: int = 64) -> Inst:
    cfg = Cfg(max_model_len=1024, max_num_seqs=max_num_seqs)
    return Inst(DecodeScheduler(cfg, BlockManager(blocks, 16)))


def test_the_rule_weighs_time_to_decoding_and_the_stall() -> None:
    assert prefill_on_decode(via_prefill=0.5, via_decode=0.05, stall=0.04, tpot=TPOT)
    assert not prefill_on_decode(0.5, 0.2, 0.15, TPOT)  # sooner, but stalls decodes too long
    assert not prefill_on_decode(0.05, 0.06, 0.04, TPOT)  # the prefill instance is sooner
    assert not prefill_on_decode(0.05, 0.05, 0.04, TPOT)  # a tie stays on the normal path


def test_short_prompt_goes_to_decode_behind_a_long_prefill_queue_long_one_never() -> None:
    p, d = prefill(), decode()
    for i in range(4):  # 2000 prompt tokens queued on the prefill instance: ~2 s
        p.scheduler.add_request(req(f"q{i}", 500))
    assert RULE.pick(p, [d], req("short", 30)) is d
    # 150 tokens: 0.152 s on decode, longer than one TPOT target: to prefill however long
    # its queue
    assert RULE.pick(p, [d], req("long", 150)) is None


def test_with_idle_prefill_a_short_prompt_goes_where_it_decodes_soonest() -> None:
    p, d = prefill(), decode()
    short = req("short", 30)
    # idle both: the same prefill either way, decode saves the migration
    assert RULE.pick(p, [d], short) is d
    # decode busy with a 60-request batch: its step (and the one in flight) cost more
    # than the migration saves
    for i in range(60):
        d.scheduler.add_request(req(f"r{i}", 4))
    plan = d.scheduler.schedule(0.0)
    d.scheduler.update(plan, StepResult(sampled={f"r{i}": 7 for i in range(60)}), 0.01)
    assert len(d.scheduler.running) == 60
    assert RULE.pick(p, [d], short) is None


def test_no_seat_no_blocks_or_not_open_means_prefill() -> None:
    p = prefill()
    for i in range(4):
        p.scheduler.add_request(req(f"q{i}", 500))
    short = req("short", 30)
    full = decode(max_num_seqs=1)
    full.scheduler.add_request(req("other", 10))
    assert RULE.pick(p, [full], short) is None  # no seat
    tiny = decode(blocks=1)
    assert RULE.pick(p, [tiny], short) is None  # no blocks for 31 tokens
    dead = decode()
    dead.alive = False
    assert RULE.pick(p, [dead], short) is None
    ok = decode()
    assert RULE.pick(p, [dead, tiny, ok], short) is ok


def test_a_colocated_entry_never_sends_to_decode() -> None:
    c = Inst(ColocatedScheduler(Cfg(max_model_len=1024), BlockManager(512, 16)))
    for i in range(4):
        c.scheduler.add_request(req(f"q{i}", 500))
    assert RULE.pick(c, [decode()], req("short", 30)) is None
    assert RULE.pick(None, [decode()], req("short", 30)) is None


def test_a_prompt_prefilled_on_decode_decodes_there() -> None:
    """The decode scheduler prefills it from its waiting queue (as it recomputes a
    preempted request), samples its first token, then decodes it: no migration."""
    d = decode()
    r = req("x", 30, max_tokens=3)
    d.scheduler.add_request(r)
    plan = d.scheduler.schedule(0.0)
    assert [c.num_tokens for c in plan.prefill_chunks] == [30]
    d.scheduler.update(plan, StepResult(sampled={"x": 5}), 0.01)
    assert r.output_token_ids == [5] and "prefill_end" in r.timestamps
    for t in (0.02, 0.03):
        plan = d.scheduler.schedule(t)
        assert [c.context_len for c in plan.decode_chunks] == [r.num_tokens]
        d.scheduler.update(plan, StepResult(sampled={"x": 6}), t)
    assert r.finished and r.output_token_ids == [5, 6, 6]
    assert "migration_start" not in r.timestamps
    assert d.scheduler.blocks.num_free_blocks == 512


def test_serve_flags_need_disagg_a_tpot_target_and_a_latency_model(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser, subs = build_parser()
    serve = subs["serve"]

    def config(*args: str) -> DecodePrefillConfig | None:
        return decode_prefill_config(parser.parse_args(["serve", *args]), serve)

    assert config() is None  # off by default
    for args, flag in [
        (["--prefill-on-decode"], "--tpot-slo"),
        (["--prefill-on-decode", "--tpot-slo", "0.1", "--mode", "colocated"], "--mode"),
        (["--prefill-on-decode", "--tpot-slo", "0.1"], "--prefill-on-decode-profile"),
        (["--prefill-on-decode", "--tpot-slo", "0.1", "--prefill-on-decode-profile", "nofile"],
         "nofile"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit):
            config(*args)
        assert flag in capsys.readouterr().err
    got = config("--prefill-on-decode", "--tpot-slo", "0.1", "--prefill-on-decode-profile", "a100")
    assert got == DecodePrefillConfig(0.1, "a100")
    got = config("--prefill-on-decode", "--tpot-slo", "0.2", "--emulate", "a100")
    assert got == DecodePrefillConfig(0.2, None)  # the emulated devices' latency models
    sim = parser.parse_args(["simulate", "--profile", "a100", "--ttft-slo", "1", "--tpot-slo",
                             "0.1", "--prefill-on-decode"])  # fmt: skip
    assert sim.prefill_on_decode
