"""The docs are a contract: their examples and rules are checked here."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from conftest import require_fuse, require_tool

from butlerfs.layout import dataset_path

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
PACKAGE = ROOT / "butlerfs"
README = ROOT / "README.md"


def _example_rows() -> list[list[str]]:
    text = (DOCS / "SEMANTICS.md").read_text()
    block = text.split("<!-- examples:", 1)[1].split("<!-- /examples -->", 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("|")][2:]  # skip header and rule
    return [[cell.strip().strip("`") for cell in row.strip("|").split("|")] for row in rows]


def test_semantics_examples_match_the_layout():
    rows = _example_rows()
    assert len(rows) >= 8
    for dataset_type, data_id, component, extension, path, flat in rows:
        items = list(json.loads(data_id).items())
        assert dataset_path(dataset_type, items, extension, component or None) == path
        assert dataset_path(dataset_type, items, extension, component or None, flat=True) == flat
        assert re.fullmatch(r"[A-Za-z0-9._/-]+", path), path


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_design_import_rules():
    """docs/DESIGN.md: one module per outside dependency."""
    rules = {
        "mfusepy": {"fuse_ops.py"},
        "lsst.daf.butler": {"registry.py", "demo.py", "formatter.py"},
        "boto3": {"remote.py"},
        "botocore": {"remote.py"},
    }
    for module in PACKAGE.glob("*.py"):
        imported = _imports(module)
        for dependency, allowed in rules.items():
            uses = any(name == dependency or name.startswith(dependency + ".") for name in imported)
            if uses:
                assert module.name in allowed, f"{module.name} imports {dependency}: see docs/DESIGN.md"


# Fenced blocks whose commands a reader would type; each one is run below or marked illustrative.
SHELL_LANGUAGES = {"console", "sh", "bash", "shell"}
RUN_LANGUAGES = {"console", "python"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
ILLUSTRATIVE = re.compile(r"<!--\s*illustrative:\s*(\S.*?)\s*-->\Z", re.DOTALL)
# What the README's examples reach relative to the repository root.
LINKED = (".venv", "pipelines")
STEP = "@@butlerfs-docs-step"


@dataclass
class Step:
    """One ``$ `` command of a console block and the output lines shown under it."""

    command: str
    shown: list[str] = field(default_factory=list)


@dataclass
class Block:
    """A fenced block of a Markdown file."""

    language: str
    body: str
    line: int
    illustrative: str | None

    def steps(self) -> list[Step]:
        """Split a console block into commands (with ``\\`` continuations) and shown output."""
        steps: list[Step] = []
        continued = False
        for line in self.body.splitlines():
            if continued:
                steps[-1].command += "\n" + line
            elif line.startswith("$ "):
                steps.append(Step(line[2:]))
            elif line.strip():
                assert steps, f"README.md:{self.line}: output before the first command"
                steps[-1].shown.append(line)
            continued = (line.startswith("$ ") or continued) and line.endswith("\\")
        return steps


def _blocks(path: Path) -> list[Block]:
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip()
        marker = ILLUSTRATIVE.search(before[before.rfind("<!--") :]) if before.endswith("-->") else None
        blocks.append(
            Block(
                language=match.group(1),
                body=match.group(2),
                line=text.count("\n", 0, match.start()) + 1,
                illustrative=marker.group(1) if marker else None,
            )
        )
    return blocks


def _pattern(shown: str) -> str:
    """A shown line as a regex: ``...`` is anything on the line, blanks are any whitespace.

    Blanks match newlines too, so ``ls``'s columns on a terminal match its one name per
    line in a pipe.
    """
    pieces = [
        r"\s+".join(re.escape(word) for word in re.split(r"\s+", piece)) for piece in shown.split("...")
    ]
    return ".*?".join(pieces)


def _check_output(block: Block, step: Step, output: str) -> None:
    position = 0
    for shown in step.shown:
        found = re.compile(_pattern(shown.strip())).search(output, position)
        assert found, f"README.md:{block.line}: `{step.command}` did not print {shown!r}:\n{output}"
        position = found.end()


def _run_console(block: Block, cwd: Path, env: dict[str, str]) -> None:
    """Run a console block's commands in order in one bash, each followed by a marked status line."""
    steps = block.steps()
    script = ["exec 2>&1"]
    for number, step in enumerate(steps):
        script += [
            f"printf '\\n{STEP} %d\\n' {number}",
            step.command,
            "status=$?",
            f"printf '\\n{STEP} %d status %d\\n' {number} $status",
            '[ "$status" -eq 0 ] || exit "$status"',
        ]
    result = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    parts = re.split(rf"\n{STEP} (\d+)(?: status (\d+))?\n", result.stdout)
    outputs: dict[int, str] = {}
    statuses: dict[int, int] = {}
    for index in range(1, len(parts), 3):
        number, status, text = int(parts[index]), parts[index + 1], parts[index + 2]
        if status is None:
            outputs[number] = text
        else:
            statuses[number] = int(status)
    for number, step in enumerate(steps):
        assert statuses.get(number) == 0, (
            f"README.md:{block.line}: `{step.command}` exited with {statuses.get(number)}:\n"
            f"{outputs.get(number, result.stdout)}"
        )
        _check_output(block, step, outputs[number])


def _mounts_under(directory: Path) -> list[str]:
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    prefix = str(directory) + "/"
    return [point for point in points if point.startswith(prefix)]


def test_readme_blocks_are_run_or_marked_illustrative():
    for block in _blocks(README):
        if block.language in SHELL_LANGUAGES | RUN_LANGUAGES:
            runnable = block.language in RUN_LANGUAGES and block.illustrative is None
            assert runnable or block.illustrative, (
                f"README.md:{block.line}: a ```{block.language} block that no test runs: make it runnable "
                "or mark it with <!-- illustrative: why --> right before it"
            )


def test_readme_runs_as_written(tmp_path):
    """Every console and python block of README.md not marked illustrative, in order, in one directory."""
    require_fuse()
    for tool in ("getfattr", "fitsverify", "source-extractor", "bwrap"):
        require_tool(tool)
    blocks = [b for b in _blocks(README) if b.language in RUN_LANGUAGES and b.illustrative is None]
    commands = " ".join(step.command for b in blocks if b.language == "console" for step in b.steps())
    for story in ("butlerfs demo-repo demo-repo", "butlerfs mount demo-repo", "butlerfs run", "pipetask run"):
        assert story in commands, f"README.md no longer runs `{story}`"
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name)
    env = dict(os.environ, PATH=f"{tmp_path / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    try:
        for block in blocks:
            if block.language == "console":
                _run_console(block, tmp_path, env)
            else:
                result = subprocess.run(
                    [str(tmp_path / ".venv" / "bin" / "python"), "-c", block.body],
                    cwd=tmp_path,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                assert result.returncode == 0, (
                    f"README.md:{block.line}: python block failed:\n{result.stderr}"
                )
    finally:
        left = _mounts_under(tmp_path)
        for point in reversed(left):
            subprocess.run(["fusermount3", "-uz", point], check=False)
    assert not left, f"README.md left mounts behind: {left}"
