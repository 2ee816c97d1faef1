"""Hostile programs and hostile values: nothing reaches outside a workspace.

Every case runs the installed ``butlerfs run`` (and, where it applies, ``pipetask run`` of the
wrapper task) with the sandbox off, the worst case: the harvest and the runner are what must
hold. Each test checks the decoys it aimed at byte for byte afterwards, that nothing was
stored, and that the other data ID of the run went on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest
from conftest import BIN, DEFAULTS, require_fuse, require_root, require_tool

pytestmark = pytest.mark.fuse

INSTRUMENT = "LSSTCam-imSim"
HOSTILE = [
    '";touch P;"',
    "';touch P;'",
    "$(touch P)",
    "`touch P`",
    "x\ntouch P",
    "-P;touch P",
    "$P${P}\\",
    "a b*",
]
"""Physical filter names: quotes, command substitution, a newline, a leading ``-``, globs."""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory):
    """A demo repository owned by this module (1 visit x 2 detectors, 64 px)."""
    from butlerfs.demo import make_demo_repo

    root = tmp_path_factory.mktemp("hostile") / "repo"
    return make_demo_repo(str(root), visits=1, detectors=2, image_size=64)


@pytest.fixture
def work(tmp_path: Path):
    """A work directory; afterwards nothing may be left mounted under the test's tmp_path."""
    require_fuse()
    yield tmp_path / "work"
    with open("/proc/self/mounts") as mounts:
        left = [line.split()[1] for line in mounts if str(tmp_path) in line.split()[1]]
    for point in left:
        subprocess.run(["umount", "-l", point], check=False)
    assert not left, f"left mounted: {left}"


def butlerfs_run(root: str, work: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(BIN / "butlerfs"),
            "run",
            root,
            "-c",
            DEFAULTS,
            "--workdir",
            str(work),
            "--sandbox",
            "off",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def manifests(work: Path) -> dict[int, dict]:
    """Manifests by detector."""
    out = {}
    for path in work.glob("instrument_*/detector_*/*/manifest.json"):
        data = json.loads(path.read_text())
        out[data["data_id"]["detector"]] = data
    return out


def digest(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def stored(root: str, dataset_type: str, run: str) -> dict[int, object]:
    """Datasets of a type in a RUN, by detector (empty when the type or RUN does not exist)."""
    from lsst.daf.butler import Butler, MissingDatasetTypeError
    from lsst.daf.butler.registry import MissingCollectionError

    butler = Butler.from_config(root)
    try:
        refs = butler.query_datasets(dataset_type, run, limit=None, explain=False)
    except (MissingDatasetTypeError, MissingCollectionError):
        return {}
    return {ref.dataId["detector"]: ref for ref in refs}


def calexp_artifact(root: str, detector: int) -> Path:
    from lsst.daf.butler import Butler

    butler = Butler.from_config(root)
    (ref,) = butler.query_datasets(
        "calexp", DEFAULTS, where=f"instrument='{INSTRUMENT}' AND detector={detector}", explain=False
    )
    return Path(butler.getURI(ref).ospath)


# -- outputs that are not regular files of the workspace -------------------------------------------


@pytest.mark.parametrize("transfer", ["move", "copy", "link", "symlink", "put"])
@pytest.mark.parametrize("aim", ["host", "artifact"])
def test_symlink_output_takes_nothing(repo, work, tmp_path, transfer, aim):
    decoy = tmp_path / "decoy.txt"
    decoy.write_text("a host file the program must not get stored or moved\n")
    target = decoy if aim == "host" else calexp_artifact(repo.root, 0)
    before = digest(target)
    run = f"u/hostile/symlink-{transfer}-{aim}"
    mode = ["--put"] if transfer == "put" else ["--transfer", transfer]
    script = f'if [ {{dataId.detector}} = 0 ]; then ln -s "{target}" out.txt; else echo fine > out.txt; fi'
    result = butlerfs_run(
        repo.root, work, "-i", "img=calexp", "-o", "out=out.txt:hostileOut", "--output-run", run,
        *mode, "--shell", "--", script,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert target.exists() and not target.is_symlink() and digest(target) == before
    m = manifests(work)
    assert m[0]["status"] == "failed" and m[1]["status"] == "ok", m
    assert f"output out (out.txt) is a symbolic link to {target}" in m[0]["reason"]
    assert "nothing of this data ID was stored" in m[0]["reason"]
    assert sorted(stored(repo.root, "hostileOut", run)) == [1]


def test_hard_link_fifo_and_device_outputs_are_refused(repo, work, tmp_path):
    decoy = tmp_path / "decoy.txt"  # same filesystem as the workspace, so a hard link can be made
    decoy.write_text("host bytes\n")
    before = digest(decoy)
    # In a kernel overlay, merged/ is another filesystem (EXDEV): the program links into upper/.
    script = (
        f'case {{dataId.detector}} in 0) ln "{decoy}" out.txt 2>/dev/null || ln "{decoy}" ../upper/out.txt;; '
        "1) mkfifo out.txt;; esac"
    )
    result = butlerfs_run(
        repo.root, work, "-i", "img=calexp", "-o", "out=out.txt:hostileLink",
        "--output-run", "u/hostile/link",
        "--shell", "--", script, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    m = manifests(work)
    assert (
        "is a hard link to a file outside the workspace (2 names, 1 of them in the workspace)"
        in m[0]["reason"]
    )
    assert "output out (out.txt) is a FIFO" in m[1]["reason"]
    assert decoy.read_text() == "host bytes\n" and digest(decoy) == before and decoy.stat().st_nlink == 2
    assert stored(repo.root, "hostileLink", "u/hostile/link") == {}


def test_hard_links_the_program_made_between_its_own_files_are_fine(repo, work):
    result = butlerfs_run(
        repo.root, work, "-i", "img=calexp", "-o", "out=out.txt:hostileOwnLink",
        "--output-run", "u/hostile/own",
        "--shell", "--", "echo mine > a.txt && ln a.txt out.txt",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(stored(repo.root, "hostileOwnLink", "u/hostile/own")) == [0, 1]
    assert all(m["undeclared"] == ["a.txt"] for m in manifests(work).values())


def test_output_through_a_symlinked_directory_is_refused(repo, work, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "out.txt").write_text("outside\n")
    script = f'mkdir -p real && echo x > real/out.txt && ln -s "{outside}" sub'
    result = butlerfs_run(
        repo.root, work, "-i", "img=calexp", "-o", "out=**/out.txt:hostileDir",
        "--output-run", "u/hostile/dir",
        "--shell", "--", script,
    )  # fmt: skip
    # os.walk does not follow sub/, so only real/out.txt matches; the outside file stays put.
    assert result.returncode == 0, result.stderr
    assert (outside / "out.txt").read_text() == "outside\n"
    assert all(m["outputs"][0]["file"] == "real/out.txt" for m in manifests(work).values())


# -- values that must never execute ----------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_repo(repo, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the module's repository whose visit can be given any physical filter name."""
    from lsst.daf.butler import Butler

    root = tmp_path_factory.mktemp("hostile-values") / "repo"
    shutil.copytree(repo.root, root, symlinks=True)
    butler = Butler.from_config(str(root), writeable=True)
    for name in HOSTILE:
        butler.registry.insertDimensionData(
            "physical_filter", dict(instrument=INSTRUMENT, name=name, band="r")
        )
    return str(root)


def set_filter(root: str, name: str) -> None:
    from lsst.daf.butler import Butler

    butler = Butler.from_config(root, writeable=True)
    (record,) = butler.registry.queryDimensionRecords("visit", instrument=INSTRUMENT)
    butler.registry.syncDimensionData("visit", dict(record.toDict(), physical_filter=name), update=True)


@pytest.mark.parametrize("value", HOSTILE)
def test_data_id_values_never_execute_in_any_quoting_style(hostile_repo, tmp_path, value):
    require_fuse()
    set_filter(hostile_repo, value)
    pf = "{dataId.physical_filter}"
    script = "; ".join(
        [
            f"printf %s {pf} > bare.txt",
            f'printf %s "{pf}" > double.txt',
            f'printf %s "pf={pf}!" > inside.txt',
            f'printf %s "$(printf %s "{pf}")" > subst.txt',
            f"printf %s {pf}{pf} > twice.txt",
            r'eval "printf %s \"\$1\"" > eval.txt',  # the script's own $1 is the first value
        ]
    )
    work = tmp_path / "work"
    result = butlerfs_run(hostile_repo, work, "-i", "img=calexp", "--shell", "--", script)
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.rglob("P")) and not Path("P").exists(), "a value executed"
    for m in manifests(work).values():
        merged = Path(m["workspace"], "upper")
        assert (merged / "double.txt").read_text() == value
        assert (merged / "inside.txt").read_text() == f"pf={value}!"
        assert (merged / "subst.txt").read_text() == value.rstrip("\n")
        assert (merged / "eval.txt").read_text() == value
        if " " not in value and "*" not in value and "\n" not in value:
            assert (merged / "bare.txt").read_text() == value
            assert (merged / "twice.txt").read_text() == value * 2
        assert m["argv"][:2] == ["/bin/sh", "-c"] and value in m["argv"][4:]
    # Without a shell a value is one argument, whatever it holds, also one starting with "-".
    direct = tmp_path / "direct"
    result = butlerfs_run(hostile_repo, direct, "-i", "img=calexp", "--", "touch", "--", pf)
    assert result.returncode == 0, result.stderr
    for m in manifests(direct).values():
        assert m["undeclared"] == [value] and m["argv"][-1] == value
    assert not list(tmp_path.rglob("P"))


def test_placeholder_in_single_quotes_is_refused_before_anything_runs(repo, work):
    result = butlerfs_run(
        repo.root, work, "-i", "img=calexp", "--shell", "--", "echo 'pf={dataId.physical_filter}'"
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "placeholder {dataId.physical_filter} is inside single quotes" in line
    assert "inside double quotes" in line
    assert not list(work.rglob("manifest.json"))


def test_hostile_work_directory_path_never_executes(repo, tmp_path):
    require_fuse()
    work = tmp_path / 'w\'$(touch P)`touch P`";touch P;"x'
    script = 'cat {img} > /dev/null && echo "{workdir}" > w.txt && echo {img} > i.txt'
    result = butlerfs_run(repo.root, work, "-i", "img=calexp", "--shell", "--", script)
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.rglob("P"))
    for m in manifests(work).values():
        assert Path(m["workspace"], "upper", "w.txt").read_text() == f"{Path(m['workspace'], 'merged')}\n"
    with open("/proc/self/mounts") as mounts:
        assert str(tmp_path) not in mounts.read()


# -- inputs changed in place -----------------------------------------------------------------------


def test_direct_input_edited_in_place_is_reported(repo, work, tmp_path):
    require_tool("sethead")
    root = tmp_path / "repo"
    shutil.copytree(repo.root, root, symlinks=True)
    artifact = calexp_artifact(str(root), 0)
    artifact.chmod(0o644)  # a Butler file the runner can write, as often at the data facilities
    result = butlerfs_run(
        str(root), work, "-i", "img=calexp:direct",
        "-w", f"instrument='{INSTRUMENT}' AND detector=0", "--", "sethead", "{img}", "BFSHOST=1",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    (m,) = manifests(work).values()
    assert m["status"] == "failed"
    assert f"the program modified the repository artifact {artifact}" in m["reason"]
    assert "img=TYPE:copy" in m["reason"]
    assert "modified the repository artifact" in result.stdout + result.stderr


def test_direct_input_copy_mode_leaves_the_repository_alone(repo, work):
    require_tool("sethead")
    before = digest(calexp_artifact(repo.root, 0))
    result = butlerfs_run(
        repo.root, work, "-i", "img=calexp:copy",
        "-w", f"instrument='{INSTRUMENT}' AND detector=0", "--", "sethead", "{img}", "BFSHOST=1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert digest(calexp_artifact(repo.root, 0)) == before


# -- processes that try to outlive their data ID ---------------------------------------------------


def sleepers(tag: str) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        if tag in " ".join(proc.info["cmdline"] or []):
            out.append(proc)
    return out


def test_daemonized_grandchild_is_stopped_and_recorded(repo, work):
    tag = "3141.5926"
    try:
        script = f"( setsid nohup sleep {tag} > /dev/null 2>&1 & ) ; echo started > out.txt"
        result = butlerfs_run(repo.root, work, "-i", "img=calexp", "--shell", "--", script, timeout=60)
        assert result.returncode == 0, result.stderr
        assert not sleepers(tag), "a daemonized grandchild outlived its data ID"
        for m in manifests(work).values():
            assert m["status"] == "ok"
            # Recorded as it was when stopped: "sleep ...", or, caught between fork and exec,
            # "setsid nohup sleep ..." or the forked shell's own command line; caught inside an
            # execve that outlasted the reaper's second look, the name of the program it was.
            (killed,) = m["killed"]
            assert f"sleep {tag}" in killed["command"] or killed["command"] in {"setsid", "nohup"}, killed
    finally:
        for proc in sleepers(tag):
            proc.kill()


# -- the same through the PipelineTask -------------------------------------------------------------

PIPELINE = """\
description: hostile programs under pipetask
tasks:
  hostile:
    class: wrapper.task.ExternalProgramTask
    config:
      dimensions: [instrument, visit, detector]
      inputs: {{calexp: calexp}}
      storageClasses: {{calexp: ExposureF}}
      outputs: {{out: hostileTaskOut}}
      outputGlobs: {{out: out.txt}}
      sandbox: "off"
      shell: true
      workdir: {workdir}
      command: >-
        printf %s "{{dataId.physical_filter}}" > pf.txt;
        if [ {{dataId.detector}} = 0 ]; then ln -s "{decoy}" out.txt; else cp pf.txt out.txt; fi
"""


def test_pipeline_task_symlink_output_and_values(hostile_repo, tmp_path):
    require_fuse()
    value = '";touch P;"'
    set_filter(hostile_repo, value)
    decoy = tmp_path / "decoy.txt"
    decoy.write_text("host\n")
    pipeline = tmp_path / "hostile.yaml"
    pipeline.write_text(PIPELINE.format(workdir=tmp_path / "ws", decoy=decoy))
    result = subprocess.run(
        [
            str(BIN / "pipetask"), "run", "-b", hostile_repo, "-i", DEFAULTS, "-o", "u/hostile/task",
            "-p", str(pipeline), "--register-dataset-types",
        ],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
    )  # fmt: skip
    assert result.returncode != 0
    assert f"output out (out.txt) is a symbolic link to {decoy}" in result.stderr
    assert decoy.read_text() == "host\n" and not list(tmp_path.rglob("P"))
    refs = stored(hostile_repo, "hostileTaskOut", "u/hostile/task")
    if not refs:  # the output collection is a CHAINED one: find its RUN
        from lsst.daf.butler import Butler

        butler = Butler.from_config(hostile_repo)
        refs = {
            r.dataId["detector"]: r
            for r in butler.query_datasets("hostileTaskOut", "u/hostile/task", limit=None, explain=False)
        }
    assert sorted(refs) == [1]
    from lsst.daf.butler import Butler

    path = Butler.from_config(hostile_repo).getURI(refs[1]).ospath
    assert Path(path).read_text() == value


# -- a full disk -----------------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 2 MiB tmpfs (root only: an ordinary user cannot mount one)."""
    require_root("an ordinary user cannot mount a tmpfs to fill (the same code path runs for users)")
    point = tmp_path / "tiny"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_program_filling_the_workspace_is_a_clear_failure(repo, tiny_disk, tmp_path):
    require_fuse()
    work = tiny_disk / "work"
    result = butlerfs_run(
        repo.root, work, "-i", "img=calexp", "-o", "out=big.bin:hostileBig", "--output-run", "u/hostile/full",
        "--", "dd", "if=/dev/zero", "of=big.bin", "bs=64k", "count=100",
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output and "internal error" not in output, output
    assert f"the workspace ran out of space ({work}/instrument_" in output, output
    assert stored(repo.root, "hostileBig", "u/hostile/full") == {}
    with open("/proc/self/mounts") as mounts:
        left = [line.split()[1] for line in mounts if str(work) in line.split()[1]]
    assert not left, left


def test_peak_memory_of_a_short_program_is_caught(tmp_path):
    import sys

    from wrapper.execute import execute

    # 64 MiB touched and gone in a few ms: too short for the samples, caught by wait4.
    code = "b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096])"
    result = execute(
        [sys.executable, "-I", "-S", "-c", code], cwd=tmp_path, stdout=tmp_path / "o", stderr=tmp_path / "e"
    )
    assert result.ok and result.peak_rss >= 64 << 20, result
