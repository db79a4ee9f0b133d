"""The README's commands and snippets, in order, and a dry check of each against what it
names: a `distserve` verb's flags against the CLI's own argument parser, a benchmark
script's against the script's parser (run up to its `parse_args` and no further), a pip
extra against pyproject.toml, a Python snippet by compiling it. Nothing is run.

The convention, which `scripts/readme_check` (the fresh-clone run) follows:
- every line of a ```bash block and every ```python block is a step, run in order;
- a command holding `...` is an elided example: checked, never run;
- inline `distserve ...` and `python ...` spans in the prose (the measurement tables'
  commands, minutes to hours each) are checked, never run;
- the block after `<!-- test-command -->` is what .ci/run runs.

`python scripts/readme_commands.py` lists the steps and checks them (exit 1 on a failure).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_MARKER = "<!-- test-command -->"
ELLIPSIS = "..."


@dataclass(frozen=True)
class Step:
    """One command line (a ```bash line, `\\`-continuations joined), one ```python block,
    or one inline command span; `line` is where it starts in the README (1-based)."""

    line: int
    kind: str  # "shell", "python" or "inline"
    text: str
    test_command: bool = False

    @property
    def elided(self) -> bool:
        return self.kind != "python" and ELLIPSIS in shlex.split(self.text, comments=True)

    @property
    def runs(self) -> bool:
        """Whether the fresh-clone run executes it (else it is only checked)."""
        return self.kind != "inline" and not self.elided


def steps(readme: str) -> list[Step]:
    """Every step of the README, in the order a reader meets them."""
    lines = readme.splitlines()
    out: list[Step] = []
    prose = list(lines)  # the text outside code blocks, code blanked (line numbers kept)
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise ValueError(f"README.md:{start + 1}: a code block is never closed")
        body = lines[start + 1 : end]
        marked = any(ln.strip() == TEST_MARKER for ln in lines[max(0, start - 2) : start])
        if lang == "bash":
            out += _shell_steps(body, start + 2, marked)
        elif lang == "python":
            out.append(Step(start + 2, "python", "\n".join(body) + "\n", marked))
        for j in range(start, end + 1):
            prose[j] = ""
        i = end + 1
    out += _inline_steps("\n".join(prose))
    return sorted(out, key=lambda s: s.line)


def _shell_steps(body: list[str], first: int, marked: bool) -> list[Step]:
    out, cur, at = [], "", first
    for n, raw in enumerate(body):
        if not cur:
            at = first + n
        line = raw.rstrip()
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        if cur.strip() and not cur.strip().startswith("#"):
            out.append(Step(at, "shell", " ".join(cur.split()), marked))
        cur = ""
    return out


def _inline_steps(prose: str) -> list[Step]:
    """Inline code spans that are whole commands: `distserve VERB FLAGS...` or `python
    FILE|-m MODULE ...` (a bare `distserve VERB` names the verb, `distserve ready: ...` is
    output; spans with `<...>` are patterns)."""
    out = []
    for m in re.finditer(r"`([^`]+)`", prose):
        text = " ".join(m.group(1).split())
        words = text.split()
        if "<" in text or not words:
            continue
        if (words[0] == "distserve" and len(words) > 2 and words[1].isidentifier()) or (
            words[0] == "python" and len(words) > 1
        ):
            out.append(Step(prose.count("\n", 0, m.start()) + 1, "inline", text))
    return out


def commands(step: Step) -> list[list[str]]:
    """A shell step's commands as argv lists (split at `&&`, `;` and `|`)."""
    lex = shlex.shlex(step.text, posix=True, punctuation_chars="&;|")
    lex.whitespace_split = True
    out: list[list[str]] = [[]]
    for tok in lex:
        if tok in ("&&", ";", "|", "||"):
            out.append([])
        else:
            out[-1].append(tok)
    return [c for c in out if c]


# -- the checks: each returns None, or what is wrong -------------------------------------


def check(step: Step, repo: Path = REPO) -> str | None:
    if step.kind == "python":
        return _check_python(step.text, repo)
    for argv in commands(step):
        problem = check_argv(argv, repo)
        if problem:
            return f"{shlex.join(argv)}: {problem}"
    return None


def check_argv(argv: list[str], repo: Path = REPO) -> str | None:
    prog, args = argv[0], argv[1:]
    elided = ELLIPSIS in args
    if elided:  # `--flag ...` elides the flag's value: keep a stand-in for it
        args = [
            "1" if a == ELLIPSIS and i and args[i - 1].startswith("--") else a
            for i, a in enumerate(args)
        ]
        args = [a for a in args if a != ELLIPSIS]
    if prog == "distserve":
        return _check_cli(args, elided)
    if prog == "python" and args[:1] == ["-m"]:
        return _check_module(args[1], args[2:], repo, elided)
    if prog == "python" and args and args[0].endswith(".py"):
        script = repo / args[0]
        if not script.is_file():
            return f"no such script {args[0]}"
        return _check_script(script, args[1:], elided)
    if prog == "pip":
        return _check_pip(args, repo)
    if prog == "curl":
        return _check_curl(args)
    if prog.startswith("scripts/"):
        return None if (repo / prog).is_file() else f"no such script {prog}"
    return f"{prog!r} is not a command this check knows (add it to scripts/readme_commands.py)"


def _check_cli(args: list[str], elided: bool) -> str | None:
    sys.path.insert(0, str(REPO))
    try:
        from distserve.cli import build_parser

        parser, _ = build_parser()
    finally:
        sys.path.remove(str(REPO))
    return _parse(lambda: parser.parse_args(args), parser, elided)


def _check_module(module: str, args: list[str], repo: Path, elided: bool) -> str | None:
    base = repo / module.replace(".", "/")
    if base.with_suffix(".py").is_file():
        path = base.with_suffix(".py")
    elif (base / "__main__.py").is_file():
        path = base / "__main__.py"
    else:
        return f"no module {module} in the repository"
    if module in ("distserve.cli", "distserve"):
        return _check_cli(args, elided)
    return _check_script(path, args, elided) if args else None


class _Parsed(Exception):
    """Raised in place of returning from a script's `parse_args`, so it runs no further."""


def _check_script(path: Path, args: list[str], elided: bool) -> str | None:
    """Run `path` as __main__ up to its ArgumentParser.parse_args and stop there."""
    real = argparse.ArgumentParser.parse_args
    seen: list[argparse.ArgumentParser] = []

    def parse_and_stop(self, a=None, namespace=None):  # type: ignore[no-untyped-def]
        seen.append(self)
        if elided:
            _relax(self)
        raise _Parsed(real(self, a, namespace))

    argv, path_before = sys.argv, list(sys.path)
    sys.argv = [str(path), *args]
    sys.path[:0] = [str(path.parent), str(REPO)]
    err = io.StringIO()
    try:
        argparse.ArgumentParser.parse_args = parse_and_stop  # type: ignore[method-assign]
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(path), run_name="__main__")
    except _Parsed:
        return None
    except SystemExit as e:
        return _last_line(err.getvalue()) or f"exited {e.code} while parsing"
    finally:
        argparse.ArgumentParser.parse_args = real  # type: ignore[method-assign]
        sys.argv, sys.path[:] = argv, path_before
    return "ran to its end without parsing arguments" if not seen else None


def _parse(parse, parser: argparse.ArgumentParser, elided: bool) -> str | None:  # type: ignore[no-untyped-def]
    if elided:
        _relax(parser)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse()
    except SystemExit as e:
        return _last_line(err.getvalue()) or f"exited {e.code} while parsing"
    return None


def _relax(parser: argparse.ArgumentParser) -> None:
    """An elided command (`...`) may leave out required flags: check only those given."""
    for action in parser._actions:  # noqa: SLF001
        action.required = False
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for sub in action.choices.values():
                _relax(sub)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _check_pip(args: list[str], repo: Path) -> str | None:
    """`pip install -e '.[a,b]'`: every extra named is declared in pyproject.toml."""
    extras = declared_extras(repo)
    for a in args:
        m = re.fullmatch(r"\.\[([\w,-]+)\]", a)
        if m:
            missing = [x for x in m.group(1).split(",") if x not in extras]
            if missing:
                return f"extra {', '.join(missing)} is not in pyproject.toml"
    return None


def declared_extras(repo: Path = REPO) -> set[str]:
    text = (repo / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, flags=re.M))


def _check_curl(args: list[str]) -> str | None:
    """A JSON body (-d) must parse."""
    for flag, value in zip(args, args[1:], strict=False):
        if flag in ("-d", "--data"):
            try:
                json.loads(value)
            except ValueError as e:
                return f"its -d body is not JSON: {e}"
    return None


def _check_python(code: str, repo: Path) -> str | None:
    try:
        compile(code, "README snippet", "exec")
    except SyntaxError as e:
        return f"line {e.lineno} of the snippet: {e.msg}"
    for m in re.finditer(r"pip install -e '(\.\[[\w,-]+\])'", code):
        problem = _check_pip([m.group(1)], repo)
        if problem:
            return problem
    return None


def main() -> int:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    failed = 0
    for s in steps(readme):
        problem = check(s)
        how = "run" if s.runs else "check"
        first = s.text.strip().splitlines()[0]
        print(
            f"README.md:{s.line:<4} {s.kind:6s} {how:5s} {'FAIL' if problem else 'ok':4s} {first}"
        )
        if problem:
            print(f"    {problem}")
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
