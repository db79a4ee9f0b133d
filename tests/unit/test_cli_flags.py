"""The CLI's flags, parsed in this process (no verb runs): every flag has help, the flag
groups shared by several verbs mean and check the same everywhere, and bad values exit
with status 2 naming the flag."""

from __future__ import annotations

import argparse

import pytest

from distserve.cli import build_parser
from distserve.cli.common import workload_spec

SLO = ["--ttft-slo", "1", "--tpot-slo", "0.1"]
REQUIRED = {
    "generate": ["hi"],
    "serve": [],
    "bench": SLO,
    "goodput": [*SLO, "--rates", "1,2"],
    "profile": ["--output", "p.json"],
    "simulate": ["--profile", "a100", *SLO],
    "plan": ["--profile", "a100", "--devices-per-node", "2", *SLO],
}


def parse(verb: str, *args: str) -> argparse.Namespace:
    parser, _ = build_parser()
    return parser.parse_args([verb, *REQUIRED[verb], *args])


def test_every_verb_parses_with_only_its_required_flags() -> None:
    parser, subs = build_parser()
    assert set(subs) == set(REQUIRED)
    for verb in subs:
        assert parse(verb).verb == verb


def test_every_flag_has_help() -> None:
    _, subs = build_parser()
    for verb, p in subs.items():
        for action in p._actions:  # noqa: SLF001
            assert action.help, f"{verb} {action.option_strings or action.dest} has no help"


def test_a_flag_several_verbs_share_is_checked_alike() -> None:
    """Same type, choices, metavar and action wherever a flag appears; except --model and
    --output, whose meaning is each verb's own (a tokenizer or a profile's model; a
    results or a profile file), and plan's --profile and --profile-decode, which it
    takes several times (one per shape)."""
    own = {"-h", "--model", "--output", "--profile", "--profile-decode"}
    _, subs = build_parser()
    seen: dict[str, tuple[object, ...]] = {}
    for verb, p in subs.items():
        for a in p._actions:  # noqa: SLF001
            if not a.option_strings or a.option_strings[0] in own:
                continue
            flag = a.option_strings[0]
            shape = (getattr(a.type, "__name__", None), a.choices, a.metavar, type(a).__name__)
            first = seen.setdefault(flag, (verb, *shape))
            assert first[1:] == shape, f"{flag}: {first[0]} {first[1:]} but {verb} {shape}"


@pytest.mark.parametrize(
    "verb,num_requests,tokenizer",
    [("bench", 100, None), ("goodput", 100, None), ("simulate", 1000, "smollm2-135m")],
)
def test_each_verb_keeps_its_own_workload_defaults(
    verb: str, num_requests: int, tokenizer: str | None
) -> None:
    args = parse(verb)
    assert (args.num_requests, args.model, args.dataset, args.seed) == (
        num_requests,
        tokenizer,
        "chatbot",
        0,
    )
    assert (args.burstiness, args.prompt_len, args.output_len) == (1.0, (128, 512), (32, 128))
    assert (args.ttft_slo, args.tpot_slo) == (1.0, 0.1)


def test_plan_and_goodput_keep_their_attainment_flags() -> None:
    assert parse("goodput").target == 0.9 and parse("goodput", "--target", "1").target == 1
    plan = parse("plan", "--attainment", "0.5")
    assert plan.attainment == 0.5 and plan.num_requests == 400 and plan.model is None
    assert plan.rate is None  # plan's --rate is a target rate, not the arrival flag
    assert not {"burstiness", "prompt_len", "output_len"} & set(vars(plan))


def test_workload_flags_make_the_spec() -> None:
    args = parse(
        "simulate", "--dataset", "random", "--num-requests", "7", "--rate", "inf",
        "--burstiness", "2", "--seed", "3", "--max-prompt-len", "40", "--max-output-len",
        "9", "--prompt-len", "16,64", "--output-len", "5",
    )  # fmt: skip
    spec = workload_spec(args, args.rate)
    assert (spec.dataset, spec.num_requests, spec.rate, spec.burstiness, spec.seed) == (
        "random",
        7,
        float("inf"),
        2.0,
        3,
    )
    assert (spec.max_prompt_len, spec.max_output_len) == (40, 9)
    assert (spec.prompt_len, spec.output_len, spec.trace_path) == ((16, 64), (5, 5), None)
    plan = workload_spec(parse("plan", "--dataset", "trace", "--trace", "t.csv"), rate=1.0)
    assert (plan.burstiness, plan.prompt_len, plan.trace_path) == (1.0, (128, 512), "t.csv")


@pytest.mark.parametrize(
    "verb,args,flag",
    [
        ("bench", ["--prompt-len", "64,16"], "--prompt-len"),
        ("bench", ["--output-len", "0"], "--output-len"),
        ("bench", ["--dataset", "nope"], "--dataset"),
        ("bench", ["--rate", "0"], "--rate"),
        ("goodput", ["--target", "1.5"], "--target"),
        ("goodput", ["--burstiness", "-1"], "--burstiness"),
        ("simulate", ["--num-requests", "0"], "--num-requests"),
        ("simulate", ["--instances", "0"], "--instances"),
        ("simulate", ["--mode", "split"], "--mode"),
        ("simulate", ["--replan-interval", "0"], "--replan-interval"),
        ("simulate", ["--replan-dwell", "-1"], "--replan-dwell"),
        ("simulate", ["--replan-chunk", "-1"], "--replan-chunk"),
        ("simulate", ["--replan-load", "0.9"], "--replan-load"),
        ("serve", ["--replan-load", "0"], "--replan-load"),
        ("serve", ["--replan-step-overhead", "-0.001"], "--replan-step-overhead"),
        ("simulate", ["--replan-step-overhead", "x"], "--replan-step-overhead"),
        ("serve", ["--prefill-instances", "0"], "--prefill-instances"),
        ("serve", ["--kv-store-disk-gb", "0"], "--kv-store-disk-gb"),
        ("simulate", ["--kv-store-disk-gb", "-1"], "--kv-store-disk-gb"),
        ("plan", ["--attainment", "0"], "--attainment"),
        ("plan", ["--max-prompt-len", "0"], "--max-prompt-len"),
        ("plan", ["--max-pp", "0"], "--max-pp"),
        ("generate", ["--max-tokens", "0"], "--max-tokens"),
    ],
)
def test_bad_values_exit_2_naming_the_flag(
    verb: str, args: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        parse(verb, *args)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_slo_flags_are_required() -> None:
    parser, _ = build_parser()
    for verb in ("bench", "goodput", "simulate", "plan"):
        args = [a for a in REQUIRED[verb] if a not in SLO]
        with pytest.raises(SystemExit):
            parser.parse_args([verb, *args])


def test_generate_stop_reads_shell_escapes() -> None:
    # `distserve generate --stop "\n"` gets a backslash and an n from the shell.
    from distserve.cli.generate import unescape

    assert unescape(r"\n") == "\n"
    assert unescape(r"a\tb\\c") == "a\tb\\c"
    assert unescape(r"\x") == r"\x"  # not an escape we read: kept as typed
    assert unescape("é") == "é"


@pytest.mark.parametrize("verb", ["serve", "generate", "simulate"])
def test_prefix_caching_is_on_unless_turned_off(verb: str) -> None:
    assert parse(verb).prefix_caching is True
    assert parse(verb, "--no-prefix-caching").prefix_caching is False


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"kv_store_disk_gb": 1.0}, "kv_store_disk_gb"),  # no store in memory
        ({"kv_store_gb": 1.0, "kv_store_disk_dir": "/tmp"}, "kv_store_disk_dir"),  # no tier
        (
            {"kv_store_gb": 1.0, "kv_store_disk_gb": 1.0, "kv_store_disk_dir": "/no/such/dir"},
            "kv_store_disk_dir",
        ),
    ],
)
def test_the_store_s_disk_tier_settings_are_checked(kw: dict[str, object], field: str) -> None:
    """serve names the flag of the field a ServerConfig error starts with (flag_message)."""
    from distserve.server.launch import ServerConfig

    with pytest.raises(ValueError, match=f"^{field} "):
        ServerConfig(**kw)  # type: ignore[arg-type]
    ServerConfig(kv_store_gb=1.0, kv_store_disk_gb=1.0, kv_store_disk_dir="/tmp")
