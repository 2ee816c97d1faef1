"""``butlerfs run``: real programs once per data ID, outputs harvested into the Butler.

The tests run the installed command on a small demo repository of their own (2 visits x 2
detectors: 4 calexps, raws, certified biases and flats), so outputs and dataset types never
touch the session's shared one.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import BIN, DEFAULTS, REGISTRIES, make_repo, require, require_fuse, require_tool

from wrapper.template import CommandTemplate, TemplateError
from wrapper.workspace import glob_match

pytestmark = pytest.mark.fuse

INSTRUMENT = "LSSTCam-imSim"
SEX_PARAMS = "NUMBER\nX_IMAGE\nY_IMAGE\nFLUX_AUTO\nFLAGS\n"


# -- fixtures and helpers -------------------------------------------------------------------------


REPO_SHAPE = {"visits": 2, "detectors": 2, "image_size": 128}


@pytest.fixture(scope="module")
def repo(request: pytest.FixtureRequest):
    """A demo repository owned by this module (2 visits x 2 detectors, 128 px)."""
    return make_repo(request, "run", "sqlite", **REPO_SHAPE)


@pytest.fixture(scope="module")
def repo_pg(request: pytest.FixtureRequest):
    """The same with its registry in PostgreSQL."""
    return make_repo(request, "run", "postgresql", **REPO_SHAPE)


@pytest.fixture(params=REGISTRIES)
def any_repo(request: pytest.FixtureRequest):
    """`repo` or `repo_pg`: a test that takes it runs once per registry database."""
    return request.getfixturevalue("repo" if request.param == "sqlite" else "repo_pg")


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


def butlerfs_run(repo, work: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``butlerfs run REPO -c DEFAULTS --workdir WORK ARGS...``."""
    return subprocess.run(
        [str(BIN / "butlerfs"), "run", repo.root, "-c", DEFAULTS, "--workdir", str(work), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def manifests(work: Path) -> dict[tuple[int, int], dict]:
    """Manifests by (detector, visit or exposure)."""
    out = {}
    for path in work.glob("instrument_*/detector_*/*/manifest.json"):
        data = json.loads(path.read_text())
        other = data["data_id"].get("visit", data["data_id"].get("exposure"))
        out[(data["data_id"]["detector"], other)] = data
    return out


def open_butler(repo, writeable: bool = False):
    from lsst.daf.butler import Butler

    return Butler.from_config(repo.root, writeable=writeable)


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def n_calexps(repo) -> int:
    return repo.dataset_counts["calexp"]


def require_sandbox() -> None:
    from wrapper.sandbox import bwrap_works

    problem = bwrap_works()
    require(problem is None, f"a working bubblewrap ({problem})")


# -- templates (no Butler, no kernel) -------------------------------------------------------------


def test_template_placeholders_anywhere_and_literal_braces():
    t = CommandTemplate.parse(["prog", "{img}[1]", "-x", "{{a}}_{dataId.visit}", "{workdir}/o"])
    assert t.placeholders == {"img", "dataId.visit", "workdir"}
    t.validate(["img"], ["instrument", "visit"])
    argv = t.render({"img": "/m/c a.fits"}, {"visit": 7}, "/w")
    assert argv == ["prog", "/m/c a.fits[1]", "-x", "{a}_7", "/w/o"]


def test_template_shell_values_are_positional_parameters():
    t = CommandTemplate.parse(['cat {img} | wc -c > n.txt; echo "{img} {{ok}} {dataId.visit}"'], shell=True)
    argv = t.render({"img": "/m/a b;rm -rf x.fits"}, {"visit": 7}, "/w")
    script = 'cat "${1}" | wc -c > n.txt; echo "${1} {ok} ${2}"'
    assert argv == ["/bin/sh", "-c", script, "sh", "/m/a b;rm -rf x.fits", "7"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["prog", "{imgg}"], "undefined placeholder {imgg}"),
        (["prog", "{dataId.vist}"], "undefined placeholder {dataId.vist}"),
        (["prog", "{print $1}"], "undefined placeholder {print $1}"),
        (["prog", "a}b"], "unbalanced"),
        (["prog", "{}"], "empty placeholder"),
    ],
)
def test_template_errors(args, message):
    with pytest.raises(TemplateError, match=message.replace("{", r"\{").replace("$", r"\$")):
        CommandTemplate.parse(args).validate(["img"], ["instrument", "visit"])


def test_glob_match():
    assert glob_match("cat.fits", "cat.fits") and not glob_match("cat.fits", "sub/cat.fits")
    assert glob_match("*.fits", "a.fits") and not glob_match("*.fits", "d/a.fits")
    assert glob_match("**/*.fits", "a.fits") and glob_match("**/*.fits", "d/e/a.fits")
    assert glob_match("cat_[0-9].txt", "cat_3.txt") and not glob_match("cat_[!0-9].txt", "cat_3.txt")


# -- real programs --------------------------------------------------------------------------------


def test_source_extractor_catalogs_ingested_read_back_and_resumed(any_repo, work, tmp_path):
    repo = any_repo
    require_tool("source-extractor")
    require_sandbox()
    params = tmp_path / "sex.param"
    params.write_text(SEX_PARAMS)
    sex = [
        "--",
        "source-extractor",
        "{calexp}[1]",
        "-CATALOG_NAME",
        "cat.fits",
        "-CATALOG_TYPE",
        "FITS_1.0",
        "-PARAMETERS_NAME",
        str(params),
        "-FILTER",
        "N",
        "-VERBOSE_TYPE",
        "QUIET",
    ]
    args = ["-i", "calexp=calexp", "-o", "cat=cat.fits:srcCat", "--output-run", "u/test/sex", "-j", "2"]
    result = butlerfs_run(repo, work, *args, *sex)
    assert result.returncode == 0, result.stderr + result.stdout
    assert f"{n_calexps(repo)} ok" in result.stdout

    from astropy.io import fits
    from lsst.resources import ResourcePath

    butler = open_butler(repo)
    refs = butler.query_datasets("srcCat", "u/test/sex", limit=None, explain=False)
    assert len(refs) == n_calexps(repo)
    for ref in refs:
        uri = butler.get(ref)
        assert isinstance(uri, ResourcePath)
        with fits.open(uri.ospath) as hdul:
            rows = hdul[1].data
            assert len(rows) > 10 and {"X_IMAGE", "FLUX_AUTO"} <= set(rows.names)

    found = manifests(work)
    assert len(found) == n_calexps(repo)
    shadowed = (repo.shadowed["detector"], repo.shadowed["visit"])
    for (detector, visit), m in found.items():
        assert m["status"] == "ok" and m["exit_code"] == 0 and m["reason"] == ""
        assert m["overlay"] in ("kernel", "fuse", "links") and m["sandbox"] is True
        assert m["argv"][0].endswith("source-extractor") and m["argv"][1].endswith(".fits[1]")
        assert m["sandbox_argv"][0].endswith("bwrap")
        # A 10 ms, 10 MiB SExtractor may exit between two samples and below the reaper's own
        # size (what wait4 can tell apart): its peak is then unknown, never a made-up number.
        # tests/test_hostile.py::test_peak_memory_of_a_short_program_is_caught measures one.
        assert m["wall_time"] > 0 and m["cpu_user"] is not None
        assert m["peak_rss"] is None or m["peak_rss"] > 0
        (inp,) = m["inputs"]
        ref = butler.find_dataset(
            "calexp", instrument=INSTRUMENT, detector=detector, visit=visit, collections=DEFAULTS
        )
        assert inp["dataset_id"] == str(ref.id) and inp["staging"] == "mount"
        assert inp["given"].startswith(str(work)) and "/merged/calexp_" in inp["given"]
        if (detector, visit) == shadowed:
            assert "calexp-rerun" in inp["uri"], "find-first must pick the rerun's calexp"
        (out,) = m["outputs"]
        assert out["dataset_type"] == "srcCat" and out["file"] == "cat.fits"
        assert m["undeclared"] == []  # the catalog moved into the datastore
        assert "stdout.txt" in os.listdir(m["workspace"])

    # Resume: everything is in the output RUN already, so nothing runs again.
    again = butlerfs_run(repo, work, *args, *sex)
    assert again.returncode == 0, again.stderr
    assert f"{n_calexps(repo)} skipped" in again.stdout and "outputs already in u/test/sex" in again.stdout
    assert len(butler.query_datasets("srcCat", "u/test/sex", limit=None, explain=False)) == n_calexps(repo)


def test_sethead_edits_a_private_copy_repository_untouched(repo, work):
    require_tool("sethead")
    butler = open_butler(repo)
    refs = butler.query_datasets("calexp", DEFAULTS, limit=None, explain=False)
    before = {str(ref.id): sha256(butler.getURI(ref).ospath) for ref in refs}
    result = butlerfs_run(
        repo,
        work,
        "-i",
        "img=calexp",
        "-o",
        "edited=calexp_*.fits:calexpEdited",
        "--output-run",
        "u/test/sethead",
        "--",
        "sethead",
        "{img}",
        "BUTLERFS=edited",
    )
    assert result.returncode == 0, result.stderr + result.stdout
    after = {str(ref.id): sha256(butler.getURI(ref).ospath) for ref in refs}
    assert after == before, "the repository's files changed"

    from astropy.io import fits

    butler = open_butler(repo)
    edited = butler.query_datasets("calexpEdited", "u/test/sethead", limit=None, explain=False)
    assert len(edited) == len(refs)
    for ref in edited:
        path = butler.get(ref).ospath
        header = fits.getheader(path, 1)  # sethead edits the first extension of a data-less primary
        assert header["BUTLERFS"] == "edited"
        assert sha256(path) not in before.values()
    for m in manifests(work).values():
        assert m["outputs"][0]["file"].startswith("calexp_") and m["undeclared"] == []


ISR = """\
import sys
from astropy.io import fits
raw, bias, flat = sys.argv[1:4]
image = (fits.getdata(raw, 1).astype("f4") - fits.getdata(bias, 1)) / fits.getdata(flat, 1)
fits.PrimaryHDU(image).writeto("postisr.fits")
open("log.txt", "w").write(f"{raw} {bias} {flat}\\n")
"""


def test_isr_like_three_inputs_calibs_by_timespan_put(any_repo, work, tmp_path):
    repo = any_repo
    script = tmp_path / "isr.py"
    script.write_text(ISR)
    result = butlerfs_run(
        repo,
        work,
        "-i",
        "raw=raw",
        "-i",
        "bias=bias",
        "-i",
        "flat=flat:copy",
        "-w",
        f"instrument = '{INSTRUMENT}' AND detector = 1",
        "-o",
        "isr=postisr.fits:toyPostIsr",
        "--output-run",
        "u/test/isr",
        "--put",
        "--",
        sys.executable,
        str(script),
        "{raw}",
        "{bias}",
        "{flat}",
    )
    assert result.returncode == 0, result.stderr + result.stdout

    import numpy as np
    from astropy.io import fits

    butler = open_butler(repo)
    outs = butler.query_datasets("toyPostIsr", "u/test/isr", limit=None, explain=False)
    assert len(outs) == len(repo.visits)
    for (detector, exposure), m in manifests(work).items():
        assert detector == 1 and m["status"] == "ok"
        by_name = {i["name"]: i for i in m["inputs"]}
        assert by_name["flat"]["staging"] == "copy" and by_name["raw"]["staging"] == "mount"
        data_id = butler.registry.expandDataId(instrument=INSTRUMENT, detector=detector, exposure=exposure)
        for calib in ("bias", "flat"):
            expected = butler.find_dataset(calib, data_id, collections=DEFAULTS, timespan=data_id.timespan)
            assert by_name[calib]["dataset_id"] == str(expected.id)
        assert m["undeclared"] == ["log.txt"] and m["outputs"][0]["file"] == "postisr.fits"
        assert (Path(m["workspace"]) / "upper" / "log.txt").exists()
        (ref,) = [r for r in outs if r.dataId["exposure"] == exposure]
        stored = fits.getdata(butler.get(ref).ospath)
        raw = fits.getdata(butler.getURI("raw", data_id, collections=DEFAULTS).ospath, 1).astype("f4")
        bias = fits.getdata(butler.getURI(expected_ref(butler, "bias", data_id)).ospath, 1)
        flat = fits.getdata(butler.getURI(expected_ref(butler, "flat", data_id)).ospath, 1)
        np.testing.assert_allclose(stored, (raw - bias) / flat, rtol=1e-6)


def expected_ref(butler, calib: str, data_id):
    return butler.find_dataset(calib, data_id, collections=DEFAULTS, timespan=data_id.timespan)


def test_failing_data_id_keeps_workspace_others_ingest_then_rerun_failed(repo, work):
    command = "echo {dataId.detector} > out.txt; test {dataId.detector} -ne 1 || {{ echo boom >&2; exit 3; }}"
    args = ["-i", "img=calexp", "-o", "out=out.txt:runOut", "--output-run", "u/test/fail", "--shell"]
    result = butlerfs_run(repo, work, *args, "--", command)
    assert result.returncode == 1, result.stderr + result.stdout
    butler = open_butler(repo)
    stored = butler.query_datasets("runOut", "u/test/fail", limit=None, explain=False)
    assert sorted(ref.dataId["detector"] for ref in stored) == [0] * len(repo.visits)
    for (detector, _), m in manifests(work).items():
        if detector == 1:
            assert m["status"] == "failed" and m["exit_code"] == 3 and "boom" in m["reason"]
            ws = Path(m["workspace"])
            assert (ws / "stderr.txt").read_text() == "boom\n" and (ws / "upper" / "out.txt").exists()
            assert m["undeclared"] == ["out.txt"] and m["outputs"] == []
            # Its owner can browse and delete it with plain tools (overlayfs's work/work is 000).
            unreadable = [d for d, _, _ in os.walk(ws) if os.stat(d).st_mode & 0o700 != 0o700]
            assert not unreadable, unreadable
        else:
            assert m["status"] == "ok"
    assert "exit status 3: boom" in result.stdout

    # A rerun skips both the done and the failed data IDs and still fails ...
    again = butlerfs_run(repo, work, *args, "--", "echo fixed > out.txt")
    assert again.returncode == 1 and "--rerun-failed runs it again" in again.stdout
    # ... until asked to rerun the failed ones.
    fixed = butlerfs_run(repo, work, *args, "--rerun-failed", "--", "echo fixed > out.txt")
    assert fixed.returncode == 0, fixed.stderr + fixed.stdout
    stored = butler.query_datasets("runOut", "u/test/fail", limit=None, explain=False)
    assert sorted(ref.dataId["detector"] for ref in stored) == [0, 0, 1, 1]


@pytest.mark.parametrize("sandbox", ["on", "off"])
def test_timeout_stops_the_whole_tree(repo, work, sandbox):
    if sandbox == "on":
        require_sandbox()
    marker = f"{301 + (sandbox == 'on')}.{os.getpid():07d}"  # a sleep duration no other session uses
    command = f"trap '' TERM; sleep {marker} & sleep {marker}; echo never > out.txt"
    result = butlerfs_run(
        repo,
        work,
        "-i",
        "img=calexp",
        "-w",
        f"instrument = '{INSTRUMENT}' AND detector = 0",
        "--timeout",
        "1",
        "--kill-grace",
        "0.5",
        "--sandbox",
        sandbox,
        "-j",
        "2",
        "--shell",
        "--",
        command,
    )
    # The programs sleep for 300 s: a run that returns (butlerfs_run gives it 120 s) stopped them.
    # Wall-clock bounds on the stop would only measure the machine's load.
    assert result.returncode == 1, result.stderr + result.stdout
    for m in manifests(work).values():
        assert m["status"] == "timeout" and "timed out after 1 s" in m["reason"]
        assert m["wall_time"] >= 1.0 and "out.txt" not in m["undeclared"]  # never reached `echo never`
    left = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    assert not left, f"processes outlived the timeout: {left}"


def test_console_only_run_and_resume(repo, work):
    args = ["-i", "img=calexp:uri", "--", "echo", "{dataId.visit} {dataId.band} {img}"]
    result = butlerfs_run(repo, work, *args)
    assert result.returncode == 0, result.stderr + result.stdout
    found = manifests(work)
    assert len(found) == n_calexps(repo)
    for (_, visit), m in found.items():
        out = (Path(m["workspace"]) / "stdout.txt").read_text()
        assert out.startswith(f"{visit} ") and "file://" in out and m["inputs"][0]["staging"] == "uri"
        assert m["outputs"] == [] and m["undeclared"] == []
    again = butlerfs_run(repo, work, *args)
    assert again.returncode == 0 and f"{n_calexps(repo)} skipped" in again.stdout
    assert "ok in a previous run" in again.stdout


def test_sandbox_read_only_repository_and_no_network(repo, work):
    require_sandbox()
    butler = open_butler(repo)
    ref = butler.find_dataset(
        "calexp", instrument=INSTRUMENT, detector=0, visit=repo.visits[0], collections=DEFAULTS
    )
    path = butler.getURI(ref).ospath
    before = sha256(path)
    script = (
        "import socket, sys\n"
        "names = [n for _, n in socket.if_nameindex()]\n"
        "print(names)\n"
        "open(sys.argv[1], 'ab').write(b'x')\n"
    )
    result = butlerfs_run(
        repo,
        work,
        "-i",
        "img=calexp:direct",
        "-w",
        f"instrument = '{INSTRUMENT}' AND detector = 0 AND visit = {repo.visits[0]}",
        "--sandbox",
        "on",
        "--no-network",
        "--",
        sys.executable,
        "-c",
        script.replace("{", "{{").replace("}", "}}"),
        "{img}",
    )
    assert result.returncode == 1
    (m,) = manifests(work).values()
    assert m["inputs"][0]["given"] == path and m["network"] is False
    assert "Read-only file system" in (Path(m["workspace"]) / "stderr.txt").read_text()
    assert (Path(m["workspace"]) / "stdout.txt").read_text().strip() == "['lo']"
    assert sha256(path) == before


@pytest.mark.parametrize("overlay", ["fuse", "links"])
def test_other_overlay_modes(repo, work, overlay):
    require_tool("fuse-overlayfs")
    result = butlerfs_run(
        repo,
        work,
        "-i",
        "img=calexp",
        "-w",
        f"instrument = '{INSTRUMENT}' AND detector = 1",
        "--overlay",
        overlay,
        "--shell",
        "--",
        "head -c 2880 {img} > head.fits && mkdir -p d && echo x > d/y.txt && test -r {img}",
    )
    assert result.returncode == 0, result.stderr + result.stdout
    for m in manifests(work).values():
        assert m["overlay"] == overlay and m["status"] == "ok"
        assert m["undeclared"] == ["d/y.txt", "head.fits"]


def test_ctrl_c_stops_children_stores_nothing_unmounts(repo, work):
    marker = f"303.{os.getpid():07d}"  # a sleep duration no other session uses
    proc = subprocess.Popen(
        [
            str(BIN / "butlerfs"),
            "run",
            repo.root,
            "-c",
            DEFAULTS,
            "--workdir",
            str(work),
            "-i",
            "img=calexp",
            "-o",
            "out=out.txt:interruptedOut",
            "--output-run",
            "u/test/interrupted",
            "-j",
            "2",
            "--shell",
            "--",
            f"echo started > out.txt; sleep {marker}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONFAULTHANDLER="1"),  # SIGABRT below dumps its threads
    )
    # A program is in its sleep once out.txt exists (upper/ of an overlay, or merged/ of links).
    while not list(work.glob("instrument_*/detector_*/visit_*/*/out.txt")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=120)  # a hang detector: stopping takes seconds
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate()
        pytest.fail(f"butlerfs run did not stop after Ctrl-C; its threads:\n{err}")
    assert proc.returncode == 130, err
    assert "interrupted" in out and "Traceback" not in err
    butler = open_butler(repo)
    assert butler.query_datasets("interruptedOut", "u/test/interrupted", limit=None, explain=False) == []
    left = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    assert not left
    assert not (work / ".mnt").exists() or not os.path.ismount(work / ".mnt")


# -- bad input: one line, before anything runs ----------------------------------------------------

BAD = {
    "unknown dataset type": (["-i", "img=calexpp", "--", "true"], "unknown dataset type 'calexpp'"),
    "no data ID": (
        ["-i", "img=calexp", "-w", f"instrument = '{INSTRUMENT}' AND visit = 1", "--", "true"],
        "no data ID matched",
    ),
    "undefined placeholder": (["-i", "img=calexp", "--", "cat", "{imgg}"], "undefined placeholder {imgg}"),
    "bad data ID key": (
        ["-i", "img=calexp", "--", "echo", "{dataId.exposure}"],
        "undefined placeholder {dataId.exposure}",
    ),
    "program not found": (["-i", "img=calexp", "--", "no-such-program-xyz", "{img}"], "program not found"),
    "malformed output": (
        ["-i", "img=calexp", "-o", "cat", "--output-run", "u/x", "--", "true"],
        "malformed --output 'cat'",
    ),
    "input named after its type": (["-i", "img", "--", "true"], "unknown dataset type 'img'"),
    "malformed input": (["-i", "img=cal exp", "--", "true"], "malformed --input 'img=cal exp'"),
    "bad staging": (["-i", "img=calexp:mmap", "--", "true"], "unknown staging mode 'mmap'"),
    "no output run": (["-i", "img=calexp", "-o", "c=c.fits", "--", "true"], "--output needs --output-run"),
    "output type clash": (
        ["-i", "img=calexp", "-o", "c=c.fits:raw", "--output-run", "u/x", "--", "true"],
        "dataset type raw exists",
    ),
    "inputs not by data ID": (
        ["-i", "b=bias", "-i", "img=calexp", "--", "true"],
        "put the input with the most dimensions first",
    ),
    "bad where": (["-i", "img=calexp", "-w", "visitt = 3", "--", "true"], "invalid --where"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_before_anything_runs(repo, work, case):
    args, needle = BAD[case]
    result = butlerfs_run(repo, work, *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0], lines[0]
    assert not list(work.glob("instrument_*")), "something ran"


def test_sep_catalog_script_over_the_mount(repo, work, tmp_path):
    pytest.importorskip("sep")
    out = tmp_path / "catalog.csv"
    script = Path(__file__).parent.parent / "scripts" / "sep_catalog.py"
    visit = repo.visits[0]
    args = [
        sys.executable,
        str(script),
        repo.root,
        "-c",
        DEFAULTS,
        "--visit",
        str(visit),
        "--output",
        str(out),
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    import csv

    rows = list(csv.DictReader(out.open()))
    assert len(rows) > 50
    assert {int(r["detector"]) for r in rows} == set(repo.detectors) and {r["visit"] for r in rows} == {
        str(visit)
    }
    assert {"x", "y", "flux"} <= set(rows[0])


def test_core_modules_do_not_import_the_butler():
    """The per-data-ID core must work with inputs from anywhere (the PipelineTask's butlerQC)."""
    import ast

    package = Path(__file__).parent.parent / "wrapper"
    for name in ("core", "execute", "manifest", "outputs", "sandbox", "template", "workspace"):
        tree = ast.parse((package / f"{name}.py").read_text())
        imported = {
            node.module if isinstance(node, ast.ImportFrom) else alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        assert not any((m or "").startswith("lsst.daf.butler") for m in imported), name
        assert not imported & {"inputs", "harvest", "run", "wrapper.inputs", "wrapper.harvest"}, name
    reaper = ast.parse((package / "reaper.py").read_text())  # runs as python -I -S: no site-packages
    for node in ast.walk(reaper):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                module = (node.module if isinstance(node, ast.ImportFrom) else alias.name) or ""
                assert module.split(".")[0] in sys.stdlib_module_names, module


def test_sandboxed_program_may_live_under_tmp_and_gets_a_private_tmpdir(repo, work, tmp_path):
    # A clone (with its virtual environment) under /tmp must still run sandboxed programs.
    require_sandbox()
    program = tmp_path / "bin" / "probe.sh"
    program.parent.mkdir()
    program.write_text(
        '#!/bin/sh\necho "$TMPDIR" > tmpdir.txt\ntouch "$TMPDIR/scratch" && head -c 10 "$1" > head.bin\n'
    )
    program.chmod(0o755)
    assert str(program).startswith("/tmp/") or not str(tmp_path).startswith("/tmp/")
    result = butlerfs_run(
        repo,
        work,
        "-i",
        "img=calexp",
        "-w",
        f"instrument = '{INSTRUMENT}' AND detector = 0 AND visit = {repo.visits[0]}",
        "--sandbox",
        "on",
        "--",
        str(program),
        "{img}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (manifest,) = manifests(work).values()
    assert manifest["status"] == "ok"
    tmpdir = next(work.rglob("tmpdir.txt")).read_text().strip()
    assert tmpdir.startswith(str(work)) and Path(tmpdir, "scratch").exists()
    assert next(work.rglob("head.bin")).read_bytes() == b"SIMPLE  = "
