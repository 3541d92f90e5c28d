"""The user guide runs: every command and Python snippet in docs/*.md is executed, in order.

Per doc file, in a fresh temp dir (each file is self-contained):
- ```sh / ```console blocks: each line is a command (``$ `` prompts in console blocks mark the
  commands, other lines there are output); a trailing ``\\`` continues a line; a comment
  ``# exit N`` on the command says the exit code it must return (default 0);
- ```python blocks run with this interpreter (cwd = the temp dir);
- a block preceded by ``<!-- file: NAME -->`` is written to NAME instead (pipeline YAML);
- a block preceded by ``<!-- requires: torch -->`` needs PyTorch: it runs with this interpreter
  if it imports torch, else with ``$QGRAPH_DOCS_TORCH_PYTHON``; without either the rest of
  that doc file is skipped (its later commands use what the block made);
- ```text / ```yaml blocks without a marker are shown output or fragments, not run.

Also checked: every pass, every pass parameter and every `qgraph train` option is documented,
and relative links between the docs resolve.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
CONTRIBUTOR_DOCS = {"CONVENTIONS.md", "PASS_API.md"}   # for contributors: not part of the guide
USER_DOCS = sorted(p.name for p in DOCS.glob("*.md") if p.name not in CONTRIBUTOR_DOCS)
BIN = Path(sys.executable).parent                       # where the venv's `qgraph` script lives
COMMAND_TIMEOUT = 300

_FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
_MARKER = re.compile(r"<!--\s*(file|requires):\s*(\S+)\s*-->\s*$")
_EXIT = re.compile(r"#\s*exit\s+(\d+)\s*$")


@dataclass
class Step:
    kind: str          # "sh", "python", "file"
    text: str          # command, source, or file content
    line: int          # line in the doc, for messages
    expect: int = 0    # exit code
    target: str = ""   # file name (kind "file")
    requires: str = "" # "torch" or ""


def extract_steps(markdown: str) -> list[Step]:
    """The runnable steps of one doc, in document order."""
    steps = []
    for match in _FENCE.finditer(markdown):
        lang, body = match.group(1), match.group(2)
        line = markdown.count("\n", 0, match.start()) + 1
        before = markdown[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.search(before)
        if marker and marker.group(1) == "file":
            steps.append(Step("file", body, line, target=marker.group(2)))
        elif lang in ("sh", "console"):
            steps.extend(_commands(body, line, prompts=lang == "console"))
        elif lang == "python":
            steps.append(Step("python", body, line, requires=marker.group(2) if marker else ""))
    return steps


def _commands(body: str, first_line: int, prompts: bool) -> list[Step]:
    steps, pending, start = [], "", 0
    for offset, raw in enumerate(body.splitlines(), start=1):
        text = raw.rstrip()
        if not pending:
            if prompts:
                if not text.startswith("$ "):
                    continue
                text = text[2:]
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            start = first_line + offset
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        command, pending = pending + text, ""
        exit_match = _EXIT.search(command)
        steps.append(Step("sh", command, start, expect=int(exit_match.group(1)) if exit_match else 0))
    assert not pending, f"line {start}: command ends with a continuation backslash"
    return steps


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _torch_python() -> str | None:
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
    if probe.returncode == 0:
        return sys.executable
    other = os.environ.get("QGRAPH_DOCS_TORCH_PYTHON")
    return other if other and Path(other).exists() else None


def run_step(step: Step, where: Path, doc: str) -> None:
    if step.kind == "file":
        (where / step.target).write_text(step.text)
        return
    if step.kind == "python":
        python = sys.executable
        if step.requires == "torch":
            python = _torch_python()
            if python is None:
                pytest.skip(f"{doc}:{step.line} needs PyTorch (install it or set QGRAPH_DOCS_TORCH_PYTHON)")
        elif step.requires:
            raise AssertionError(f"{doc}:{step.line}: unknown requirement {step.requires!r}")
        args, shell, shown = [python, "-c", step.text], False, f"python block at line {step.line}"
    else:
        args, shell, shown = step.text, True, step.text
    done = subprocess.run(args, shell=shell, executable="/bin/bash" if shell else None, cwd=where, env=_env(),
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    assert done.returncode == step.expect, (
        f"{doc}:{step.line}: `{shown}` exited {done.returncode}, the doc says {step.expect}\n"
        f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")


@pytest.mark.parametrize("doc", USER_DOCS)
def test_doc_runs(doc, tmp_path):
    steps = extract_steps((DOCS / doc).read_text())
    assert any(s.kind != "file" for s in steps), f"{doc} has nothing to run"
    for step in steps:
        run_step(step, tmp_path, doc)


def test_extract_steps_understands_the_doc_syntax():
    doc = ("```sh\nqgraph a \\\n  --b c\n# a comment\nqgraph bad  # exit 2\n```\n"
           "```console\n$ qgraph x\nsome output\n```\n"
           "<!-- file: p.yaml -->\n```yaml\npasses: [canonicalize]\n```\n"
           "```yaml\nnot: run\n```\n```text\nqgraph not-run\n```\n"
           "<!-- requires: torch -->\n```python\nimport torch\n```\n")
    steps = extract_steps(doc)
    assert [(s.kind, s.text.strip(), s.expect) for s in steps] == [
        ("sh", "qgraph a    --b c", 0), ("sh", "qgraph bad  # exit 2", 2), ("sh", "qgraph x", 0),
        ("file", "passes: [canonicalize]", 0), ("python", "import torch", 0)]
    assert steps[0].line == 2 and steps[-1].requires == "torch" and steps[3].target == "p.yaml"


def _section(markdown: str, heading: str) -> str:
    match = re.search(rf"^#+ `?{re.escape(heading)}`?\b.*?$(.*?)(?=^## |\Z)", markdown, re.S | re.M)
    return match.group(1) if match else ""


def test_every_pass_and_parameter_is_documented():
    from qgraph.pipeline import all_passes
    text = (DOCS / "passes.md").read_text()
    for name, spec in all_passes().items():
        section = _section(text, name)
        assert section, f"docs/passes.md has no section for pass '{name}'"
        for param in spec.params:
            assert f"`{param}`" in section or f"{param}:" in section, \
                f"docs/passes.md: parameter '{param}' of pass '{name}' is not documented in its section"


def test_every_train_option_is_documented():
    from qgraph.cli import train
    text = (DOCS / "training.md").read_text()
    for option in train.params:
        flags = [f for f in getattr(option, "opts", []) if f.startswith("-")]
        if flags:
            assert any(f"{flag} " in text or f"{flag}`" in text for flag in flags), \
                f"docs/training.md does not mention `qgraph train {flags[-1]}`"


def test_relative_links_resolve():
    for doc in USER_DOCS:
        for target in re.findall(r"\]\((?!https?:|#)([^)#\s]+)", (DOCS / doc).read_text()):
            assert (DOCS / target).exists(), f"{doc} links to missing {target}"


def test_commands_use_only_known_programs():
    """Doc commands call qgraph, python and a few POSIX tools: nothing a user may lack."""
    allowed = {"qgraph", "python", "ls", "cat", "cp", "rm", "mkdir", "test", "head"}
    for doc in USER_DOCS:
        for step in extract_steps((DOCS / doc).read_text()):
            if step.kind == "sh":
                program = shlex.split(step.text, comments=True)[0]
                assert program in allowed, f"{doc}:{step.line}: `{program}` is not one of {sorted(allowed)}"
