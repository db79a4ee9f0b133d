"""Every command in the README parses against what it names: a `distserve` verb's flags
against the CLI's parser, a benchmark script's against that script's own parser (run up
to its parse_args), a pip extra against pyproject.toml, a Python snippet compiles. A
renamed flag, verb, script or extra fails here; nothing runs (scripts/readme_check runs
the README for real, in a fresh clone)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "readme_commands", REPO / "scripts" / "readme_commands.py"
)
assert _spec and _spec.loader
rc = importlib.util.module_from_spec(_spec)
sys.modules["readme_commands"] = rc
_spec.loader.exec_module(rc)

STEPS = rc.steps((REPO / "README.md").read_text(encoding="utf-8"))


@pytest.mark.parametrize("step", STEPS, ids=[f"README.md:{s.line}" for s in STEPS])
def test_readme_command_parses(step) -> None:
    assert rc.check(step) is None, f"README.md:{step.line}: {rc.check(step)}"


def test_the_readme_has_the_steps_a_newcomer_runs() -> None:
    """The install, serve, test command, a client snippet, bench and plan are all there
    and run (not only checked); the test command is the block .ci/run reads."""
    ran = [s for s in STEPS if s.runs]
    argvs = [argv for s in ran if s.kind == "shell" for argv in rc.commands(s)]
    verbs = {tuple(a[:2]) for a in argvs if a[0] == "distserve"}
    assert {("distserve", v) for v in ("serve", "generate", "bench", "goodput", "plan")} <= verbs
    assert any(s.kind == "python" and "openai" in s.text for s in ran)
    tests = [s for s in ran if s.test_command]
    assert len(tests) == 1 and "scripts/check" in tests[0].text
    assert any(s.kind == "inline" and "benchmarks/" in s.text for s in STEPS)


README = """# x

```
a diagram, not a command
```

<!-- test-command -->
```bash
pip install -e '.[test]' && scripts/check
```

```bash
distserve bench --dataset code --rate 1 \\
  --ttft-slo 1 --tpot-slo 0.1   # a comment
distserve plan --profile a100 ...
```

```python
print("hi")
```

Run `python benchmarks/sim_speed.py --workers
2` (inline, across a line), `distserve serve` names the verb, and once it prints
`distserve ready: http://x/v1` it serves.
"""


def test_steps_follow_the_convention() -> None:
    got = [(s.line, s.kind, s.text, s.test_command, s.runs) for s in rc.steps(README)]
    assert got == [
        (9, "shell", "pip install -e '.[test]' && scripts/check", True, True),
        (
            13,
            "shell",
            "distserve bench --dataset code --rate 1 --ttft-slo 1 --tpot-slo 0.1 # a comment",
            False,
            True,
        ),
        (15, "shell", "distserve plan --profile a100 ...", False, False),
        (19, "python", 'print("hi")\n', False, True),
        (22, "inline", "python benchmarks/sim_speed.py --workers 2", False, False),
    ]
    assert rc.commands(rc.steps(README)[0]) == [
        ["pip", "install", "-e", ".[test]"],
        ["scripts/check"],
    ]


def step(text: str, kind: str = "shell") -> object:
    return rc.Step(1, kind, text)


@pytest.mark.parametrize(
    "text,problem",
    [
        ("distserve bench --ttft-slo 1 --tpot-slo 0.1 --rte 2", "unrecognized arguments: --rte"),
        ("distserve goodput --ttft-slo 1 --tpot-slo 0.1", "required: --rates"),
        ("distserve bench --ttft-slo 1 --tpot-slo 0.1 --rate fast", "argument --rate"),
        ("distserve servee", "invalid choice: 'servee'"),
        ("distserve plan --profile a100 --devicez 4 ...", "unrecognized arguments: --devicez"),
        ("python benchmarks/sim_speed.py --no-such-flag", "unrecognized arguments"),
        ("python benchmarks/no_such_benchmark.py", "no such script"),
        ("python -m distserve.model.no_such_module", "no module"),
        ("pip install -e '.[bench,nosuchextra]'", "extra nosuchextra"),
        ("curl -d '{\"model\": }' http://127.0.0.1:8000/v1/completions", "not JSON"),
        ("make install", "not a command this check knows"),
    ],
)
def test_a_wrong_command_is_caught(text: str, problem: str) -> None:
    got = rc.check(step(text))
    assert got is not None and problem in got, got


def test_an_elided_command_may_leave_out_required_flags() -> None:
    assert rc.check(step("distserve plan --profile a100 --model opt-175b ...")) is None
    assert rc.check(step("distserve goodput --dataset code --rates ...")) is None
    assert rc.check(step("python benchmarks/planner.py --cases 66b-chatbot-32 ...")) is None


def test_a_snippet_must_compile_and_name_real_extras() -> None:
    assert "line 1" in rc.check(step("print('hi'\n", "python"))
    bad = "# pip install -e '.[nope]'\nimport os\n"
    assert "extra nope" in rc.check(step(bad, "python"))
