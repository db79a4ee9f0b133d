"""`distserve <verb>`: parses flags into configs and calls one function per verb.
Heavy modules load inside the verbs, so `distserve --help` is instant."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from distserve.cli import bench, generate, plan, profile, serve, simulate

_VERBS = {
    "generate": generate,
    "serve": serve,
    "bench": bench,
    "goodput": bench,
    "profile": profile,
    "simulate": simulate,
    "plan": plan,
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="distserve",
        description="Goodput-optimized LLM serving with disaggregated prefill and decoding.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    subs = {"generate": generate.add_parser(verbs), "serve": serve.add_parser(verbs)}
    subs["bench"], subs["goodput"] = bench.add_parsers(verbs)
    subs["profile"] = profile.add_parser(verbs)
    subs["simulate"] = simulate.add_parser(verbs)
    subs["plan"] = plan.add_parser(verbs)
    return parser, subs


def main(argv: Sequence[str] | None = None) -> int:
    parser, subs = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    return _VERBS[args.verb].run(args, subs[args.verb])  # type: ignore[no-any-return]


if __name__ == "__main__":
    sys.exit(main())
