"""One ``mount``, ``umount`` and ``run``: through ``butlerfs``, through ``butler`` and from Python.

The ``butler`` plugin (entry point ``butler.cli`` → `butlerfs.cli.butler_plugin_commands`)
offers the very command objects ``butlerfs`` has, and `butlerfs.run` takes the same options
with the same defaults (all from `wrapper.options.RunOptions`). These tests hold the three in
step: the same help, the same behaviour on a real mount and a real run, the same one-line
errors.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import BIN, DEFAULTS, require_fuse

import butlerfs
from butlerfs.cli import butler_plugin_commands, main, run_options
from wrapper.options import RunOptions, run_defaults

pytestmark = pytest.mark.fuse

ENTRY_POINTS = ("butlerfs", "butler")
SHARED = ("mount", "umount", "run")
VISIT = "instrument = 'LSSTCam-imSim' AND visit = 733724"


def cli(entry_point: str, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / entry_point), *args], capture_output=True, text=True, timeout=300, **kwargs
    )


def one_line_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory):
    """A demo repository of this module (1 visit x 2 detectors, 64 px): runs store outputs in it."""
    from butlerfs.demo import make_demo_repo

    return make_demo_repo(
        str(tmp_path_factory.mktemp("entry") / "repo"), visits=1, detectors=2, image_size=64
    )


@pytest.fixture
def no_mounts_left(tmp_path: Path):
    require_fuse()
    yield
    left = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    left = [point for point in left if point.startswith(str(tmp_path) + "/")]
    for point in reversed(left):
        subprocess.run(["fusermount3", "-uz", point], check=False)
    assert not left, f"left mounted: {left}"


# -- one definition -------------------------------------------------------------------------------


def test_butler_loads_the_butlerfs_commands_themselves():
    """daf_butler's command loader, through the ``butler.cli`` entry point, finds the same objects."""
    from lsst.daf.butler.cli.butler import cli as butler

    assert sorted(command.name for command in butler_plugin_commands()) == sorted(SHARED)
    ctx = click.Context(butler)
    for name in SHARED:
        assert butler.get_command(ctx, name) is main.commands[name]


@pytest.mark.parametrize("command", SHARED)
def test_help_is_the_same_through_both(command: str):
    from lsst.daf.butler.cli.butler import cli as butler

    helps = {}
    for name, group in (("butler", butler), ("butlerfs", main)):
        result = CliRunner().invoke(group, [command, "--help"], prog_name=name)
        assert result.exit_code == 0, result.output
        helps[name] = result.output.replace(f"Usage: {name} {command}", "Usage: X")
    assert helps["butler"] == helps["butlerfs"]


def test_run_defaults_are_those_of_run_options():
    """A bare ``butlerfs run`` command line and a bare `butlerfs.run` call mean the same RunOptions."""
    run = main.commands["run"]
    ctx = run.make_context("run", ["REPO", "-c", DEFAULTS, "-i", "img=calexp", "--", "true"])
    bare = RunOptions(repo="REPO", collections=(DEFAULTS,), inputs=("img=calexp",), command=("true",))
    assert run_options(ctx.params) == bare
    assert {p.name for p in run.params} - {"help"} == {f.name for f in dataclasses.fields(RunOptions)} - {
        "network"
    } | {"no_network"}
    keywords = inspect.signature(butlerfs.run).parameters
    assert set(keywords) == {f.name for f in dataclasses.fields(RunOptions)} | {"on_result"}
    for name, default in run_defaults().items():
        assert keywords[name].default == default, name


# -- the same behaviour ---------------------------------------------------------------------------


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_mount_ls_umount(entry_point: str, repo, tmp_path: Path, no_mounts_left):
    point = tmp_path / "mnt"
    point.mkdir()
    mounted = cli(entry_point, "mount", repo.root, str(point), "-c", DEFAULTS, "-t", "calexp")
    assert mounted.returncode == 0 and "Mounted" in mounted.stdout, mounted.stderr
    try:
        assert sorted(p.name for p in point.glob("calexp/*/*")) == ["detector_0", "detector_1"]
    finally:
        unmounted = cli(entry_point, "umount", str(point))
    assert unmounted.returncode == 0, unmounted.stderr
    assert not any(point.iterdir())


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_run_console_only(entry_point: str, repo, tmp_path: Path, no_mounts_left):
    work = tmp_path / "work"
    args = ["run", repo.root, "-c", DEFAULTS, "-i", "img=calexp", "-w", VISIT, "--workdir", str(work)]
    result = cli(entry_point, *args, "--", "wc", "-c", "{img}")
    assert result.returncode == 0, result.stderr
    assert "2 data IDs: 2 ok" in result.stdout
    for manifest in work.glob("instrument_*/detector_*/visit_*/manifest.json"):
        assert json.loads(manifest.read_text())["status"] == "ok"


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_user_errors_are_one_line(entry_point: str, repo, tmp_path: Path):
    point = tmp_path / "mnt"
    point.mkdir()
    one_line_error(cli(entry_point, "mount", repo.root, str(point), "-c", "no/such"), "no/such")
    one_line_error(cli(entry_point, "umount", str(point)), "not mounted")
    bad_run = cli(entry_point, "run", repo.root, "-c", DEFAULTS, "-i", "img=calexpp", "--", "true")
    one_line_error(bad_run, "calexpp")


# -- Python: butlerfs.run -------------------------------------------------------------------------


def test_python_run_returns_results_per_data_id(repo, tmp_path: Path, no_mounts_left):
    from lsst.daf.butler import Butler

    seen = []
    summary = butlerfs.run(
        repo.root,
        "sh -c 'wc -c < \"$0\" > size.txt' {img}",
        collections=DEFAULTS,
        inputs="img=calexp",
        where=VISIT,
        outputs="size=size.txt:calexpSize",
        output_run="u/test/api",
        workdir=str(tmp_path / "work"),
        on_result=seen.append,
    )
    assert summary.ok and len(summary) == 2 and len(seen) == 2
    butler = Butler.from_config(repo.root)
    for result in summary:
        assert result.status == "ok" and result.reason == "" and result.exit_code == 0
        assert set(result.data_id) == {"instrument", "detector", "visit"}
        stored = result.outputs["size"]
        assert stored.dataset_type == "calexpSize" and stored.file == "size.txt"
        ref = butler.get_dataset(stored.dataset_id)
        assert ref is not None and dict(ref.dataId.required) == result.data_id
        calexp = butler.find_dataset("calexp", ref.dataId, collections=DEFAULTS)
        assert int(butler.get(ref).read()) == len(butler.getURI(calexp).read())
        assert Path(result.workspace, "manifest.json").exists()
    assert "2 data IDs: 2 ok" in str(summary)

    rerun = butlerfs.run(
        repo.root,
        ["true"],
        collections=[DEFAULTS],
        inputs=["img=calexp"],
        where=VISIT,
        outputs=["size=size.txt:calexpSize"],
        output_run="u/test/api",
        workdir=str(tmp_path / "work"),
    )
    assert [r.status for r in rerun] == ["skipped", "skipped"] and rerun.ok
    assert all("already in u/test/api" in r.reason and r.outputs == {} for r in rerun)


def test_python_run_failures_are_results_and_bad_input_raises(repo, tmp_path: Path, no_mounts_left):
    summary = butlerfs.run(
        repo.root,
        "test {dataId.detector} = 0",
        collections=DEFAULTS,
        inputs="img=calexp",
        where=VISIT,
        workdir=str(tmp_path / "work"),
    )
    assert not summary.ok
    by_detector = {r.data_id["detector"]: r for r in summary}
    assert by_detector[0].status == "ok"
    assert by_detector[1].status == "failed" and by_detector[1].exit_code == 1
    assert "exit status 1" in by_detector[1].reason
    with pytest.raises(butlerfs.UsageError, match="unknown option.*job"):
        butlerfs.run(repo.root, "true", collections=DEFAULTS, inputs="img=calexp", job=2)
    with pytest.raises(butlerfs.UsageError, match="needs inputs"):
        butlerfs.run(repo.root, "true", collections=DEFAULTS)
    with pytest.raises(butlerfs.UsageError, match="no/such"):
        butlerfs.run(repo.root, "true", collections="no/such", inputs="img=calexp")


def test_importing_butlerfs_and_its_cli_does_not_import_the_butler():
    """``butlerfs --help`` and ``butlerfs mount`` start in well under a second: no daf_butler import."""
    code = (
        "import sys, butlerfs, butlerfs.cli; butlerfs.run; "
        "assert not [m for m in sys.modules if m.startswith('lsst.daf.butler')], 'imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
