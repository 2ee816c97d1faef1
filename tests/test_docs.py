"""The docs are a contract: their examples and rules are checked here."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
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
        "lsst.daf.butler": {
            "registry.py",
            "registry_direct.py",
            "datastore_direct.py",
            "datastore_remote.py",
            "demo.py",
            "formatter.py",
        },
        "boto3": {"remote.py"},
        "botocore": {"remote.py"},
        "httpx2": {"http_store.py"},
    }
    for module in PACKAGE.glob("*.py"):
        imported = _imports(module)
        for dependency, allowed in rules.items():
            uses = any(name == dependency or name.startswith(dependency + ".") for name in imported)
            if uses:
                assert module.name in allowed, f"{module.name} imports {dependency}: see docs/DESIGN.md"
    # The seam between direct and client/server Butlers is usable without the LSST stack.
    assert not any(name.split(".")[0] == "lsst" for name in _imports(PACKAGE / "datastore.py"))


# -- Every command of README.md and docs/*.md runs as written ------------------------------------
#
# A doc is read as one terminal session in a fresh directory shaped like the checkout (`.venv`,
# `pipelines` and `scripts` linked), with the venv not activated: what a doc needs it says.
# - ```console blocks run in order in bash, each `$ ` command in turn (`\` continues it), and the
#   lines shown under a command must appear in its output in order (see `_pattern`); it must
#   succeed, unless its last shown line is `(exit status N)`. Exported variables and the working
#   directory carry over to the next block, as in a terminal.
# - ```python blocks run with the venv's Python in the same directory and environment; a ```text
#   block right after one (nothing but blank lines between) is what it prints.
# - A ```yaml block whose first line is `# NAME.yaml` is a file the later commands use: it is
#   written there when the session reaches it.
# - Any of them that needs a remote service or the machine's set-up is marked
#   `<!-- illustrative: needs ... -->` right before it, and is not run.
# So a section added to any doc is covered without touching this file.

MARKDOWN = (README, *sorted(DOCS.glob("*.md")))
SHELL_LANGUAGES = {"console", "sh", "bash", "shell"}
RUN_LANGUAGES = {"console", "python"}
FENCE = re.compile(r"^( *)```(\w*)[ \t]*\n(.*?)^\1```[ \t]*$", re.MULTILINE | re.DOTALL)
ILLUSTRATIVE = re.compile(r"<!--\s*illustrative:\s*(\S.*?)\s*-->\Z", re.DOTALL)
FILE_NAME = re.compile(r"#\s*([\w.-]+\.ya?ml)\s*$")
# What the docs' examples reach relative to the checkout's root.
LINKED = (".venv", "pipelines", "scripts")
STEP = "@@butlerfs-docs-step"
# Shown numbers with a decimal point are measurements (times, sizes): any number matches them.
MEASURED = re.compile(r"\d+\.\d+")
EXIT_STATUS = re.compile(r"\(exit status (\d+)\)")


@dataclass
class Step:
    """One ``$ `` command of a console block and the output lines shown under it.

    A last shown line ``(exit status N)`` says the command fails with status N, as a doc
    showing an error message would.
    """

    command: str
    shown: list[str] = field(default_factory=list)

    @property
    def status(self) -> int:
        match = EXIT_STATUS.fullmatch(self.shown[-1].strip()) if self.shown else None
        return int(match.group(1)) if match else 0

    @property
    def output(self) -> list[str]:
        return self.shown[:-1] if self.status else self.shown


@dataclass
class Block:
    """A fenced block of a Markdown file."""

    doc: str
    language: str
    body: str
    line: int
    illustrative: str | None
    follows_block: bool
    """Only blank lines separate it from the previous block."""

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.language in RUN_LANGUAGES and self.illustrative is None

    @property
    def file_name(self) -> str | None:
        """``NAME.yaml`` for a yaml block that is a file the commands after it use."""
        first = self.body.split("\n", 1)[0]
        match = FILE_NAME.fullmatch(first) if self.language == "yaml" else None
        return match.group(1) if match and self.illustrative is None else None

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
                assert steps, f"{self.where}: output before the first command"
                steps[-1].shown.append(line)
            continued = (line.startswith("$ ") or continued) and line.endswith("\\")
        return steps


def _blocks(path: Path) -> list[Block]:
    text = path.read_text()
    blocks: list[Block] = []
    end = 0
    for match in FENCE.finditer(text):
        indent, language, body = match.group(1), match.group(2), match.group(3)
        before = text[: match.start()].rstrip()
        marker = ILLUSTRATIVE.search(before[before.rfind("<!--") :]) if before.endswith("-->") else None
        blocks.append(
            Block(
                doc=path.name,
                language=language,
                body="".join(line.removeprefix(indent) for line in body.splitlines(keepends=True)),
                line=text.count("\n", 0, match.start()) + 1,
                illustrative=marker.group(1) if marker else None,
                follows_block=bool(blocks) and not text[end : match.start()].strip(),
            )
        )
        end = match.end()
    return blocks


def _pattern(shown: str) -> str:
    """A shown line as a regex: ``...`` is anything on the line, blanks are any whitespace.

    Blanks match newlines too, so ``ls``'s columns on a terminal match its one name per
    line in a pipe. A number with a decimal point (``0.10s``, ``14.7 MiB``) is a measurement
    and matches any number.
    """

    def word(text: str) -> str:
        return r"\d+(?:\.\d+)?".join(re.escape(part) for part in MEASURED.split(text))

    pieces = [r"\s+".join(word(w) for w in re.split(r"\s+", piece)) for piece in shown.split("...")]
    return ".*?".join(pieces)


def _check_output(where: str, command: str, shown_lines: list[str], output: str) -> None:
    position = 0
    for shown in shown_lines:
        found = re.compile(_pattern(shown.strip())).search(output, position)
        assert found, f"{where}: `{command}` did not print {shown!r}:\n{output}"
        position = found.end()


class Session:
    """A reader's terminal: a directory shaped like the checkout, and the environment so far."""

    def __init__(self, root: Path) -> None:
        self.home = root / "doc"
        self.home.mkdir()
        for name in LINKED:
            (self.home / name).symlink_to(ROOT / name)
        self.state = root / "state"
        self.state.mkdir()
        self.cwd = self.home
        self.printed = ""
        venv_bin = {str(ROOT / ".venv" / "bin"), str(Path(os.sys.executable).parent)}
        path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p not in venv_bin]
        self.env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        self.env["PATH"] = os.pathsep.join(path)
        # Temporary files (a failed quantum's workspace) stay inside the test's directory.
        self.env["TMPDIR"] = str(root / "tmp")
        (root / "tmp").mkdir()

    def run(self, block: Block, previous: Block | None) -> None:
        """Run a block, write a file block, or check what the python block before printed."""
        if block.file_name:
            (self.cwd / block.file_name).write_text(block.body)
        elif block.runs and block.language == "console":
            self._console(block)
        elif block.runs:
            self.printed = self._python(block)
        elif block.language == "text" and block.follows_block and previous is not None and previous.runs:
            assert previous.language == "python", f"{block.where}: a ```text block after a console block"
            _check_output(
                block.where,
                f"the python block of line {previous.line}",
                block.body.splitlines(),
                self.printed,
            )

    def _python(self, block: Block) -> str:
        result = subprocess.run(
            [str(self.home / ".venv" / "bin" / "python"), "-c", block.body],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{block.where}: python block failed:\n{result.stdout}{result.stderr}"
        return result.stdout

    def _console(self, block: Block) -> None:
        """Run a console block's commands in order in one bash, each followed by a marked status line."""
        steps = block.steps()
        script = ["exec 2>&1"]
        for number, step in enumerate(steps):
            script += [
                f"printf '\\n{STEP} %d\\n' {number}",
                step.command,
                "status=$?",
                f"printf '\\n{STEP} %d status %d\\n' {number} $status",
                f'[ "$status" -eq {step.status} ] || exit 1',
            ]
        script.append(f"pwd > {self.state}/cwd && env -0 > {self.state}/env")
        result = subprocess.run(
            ["bash", "-c", "\n".join(script)],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=900,
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
            assert statuses.get(number) == step.status, (
                f"{block.where}: `{step.command}` exited with {statuses.get(number)}, "
                f"not {step.status}:\n{outputs.get(number, result.stdout)}"
            )
            _check_output(block.where, step.command, step.output, outputs[number])
        self.cwd = Path((self.state / "cwd").read_text().strip())
        pairs = (item.split("=", 1) for item in (self.state / "env").read_text().split("\0") if "=" in item)
        self.env = dict(pairs)


def _mounts_under(directory: Path) -> list[str]:
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    prefix = str(directory) + "/"
    return [point for point in points if point.startswith(prefix)]


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda path: path.name)
def test_blocks_are_run_or_marked_illustrative(doc: Path):
    for block in _blocks(doc):
        if block.illustrative is not None:
            assert block.illustrative.startswith("needs "), (
                f"{block.where}: say what the example needs that the tests lack: "
                "<!-- illustrative: needs a remote service or set-up ... -->"
            )
        elif block.language in SHELL_LANGUAGES - RUN_LANGUAGES:
            raise AssertionError(
                f"{block.where}: a ```{block.language} block that no test runs: make it a ```console "
                "block of `$ ` commands, or mark it with <!-- illustrative: needs ... --> right before it"
            )
        elif block.language not in RUN_LANGUAGES:
            assert not any(line.startswith("$ ") for line in block.body.splitlines()), (
                f"{block.where}: commands in a ```{block.language} block: make it a ```console block "
                "(which the tests run)"
            )


def test_readme_tells_the_story():
    consoles = [block for block in _blocks(README) if block.runs and block.language == "console"]
    commands = " ".join(step.command for block in consoles for step in block.steps())
    for story in ("butlerfs demo-repo demo-repo", "butlerfs mount demo-repo", "butlerfs run", "pipetask run"):
        assert story in commands, f"README.md no longer runs `{story}`"


RUNNABLE = [doc for doc in MARKDOWN if any(block.runs for block in _blocks(doc))]


@pytest.mark.timeout(2400)  # a hang detector: PIPELINE.md alone took 14 min at load 12
@pytest.mark.parametrize("doc", RUNNABLE, ids=lambda path: path.name)
def test_doc_runs_as_written(doc: Path, tmp_path: Path):
    """Every block of a doc not marked illustrative, in order, in one fresh directory."""
    require_fuse()
    for tool in ("getfattr", "fitsverify", "source-extractor", "bwrap"):
        require_tool(tool)
    session = Session(tmp_path)
    previous: Block | None = None
    try:
        for block in _blocks(doc):
            session.run(block, previous)
            previous = block
    finally:
        left = _mounts_under(tmp_path)
        for point in reversed(left):
            subprocess.run(["fusermount3", "-uz", point], check=False)
    assert not left, f"{doc.name} left mounts behind: {left}"


def test_the_doc_machinery_itself(tmp_path: Path):
    """The reading rules above, on a small Markdown file: what runs, what is checked, what carries over."""
    doc = tmp_path / "DOC.md"
    doc.write_text(
        """\
```console
$ export GREETING=hello
$ mkdir sub && cd sub
$ sh -c 'echo "took 0.25 s"; exit 3'
took 1.5 s
(exit status 3)
```

- a list item:

  ```yaml
  # conf.yaml
  key: value
  ```

```python
import os
print(os.environ["GREETING"], os.path.basename(os.getcwd()), open("conf.yaml").read().split()[-1])
```

```text
hello sub value
```

<!-- illustrative: needs nothing, it is a test -->
```console
$ false
```
"""
    )
    blocks = _blocks(doc)
    assert [b.language for b in blocks] == ["console", "yaml", "python", "text", "console"]
    assert blocks[1].file_name == "conf.yaml" and blocks[3].follows_block and blocks[4].illustrative
    assert [s.status for s in blocks[0].steps()] == [0, 0, 3]
    (tmp_path / "session").mkdir()
    session = Session(tmp_path / "session")
    previous = None
    for block in blocks:
        session.run(block, previous)
        previous = block
    assert session.cwd.name == "sub" and session.env["GREETING"] == "hello"
    wrong = Block("DOC.md", "text", "goodbye\n", 99, None, True)
    with pytest.raises(AssertionError, match="did not print 'goodbye'"):
        session.run(wrong, blocks[2])
