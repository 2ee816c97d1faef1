"""The wrapper PipelineTask under ``pipetask run``, quantum-backed execution and BPS (parsl).

Real ``pipetask``/``bps``/``butler`` subprocesses on a demo repository of this module
(1 visit x 2 detectors, 128 px: 2 calexps, 2 raws, certified biases and flats), with the
example pipelines of ``pipelines/``. The config checks and input staging run in-process.
"""

from __future__ import annotations

import csv
import os
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import BIN, DEFAULTS, REGISTRIES, make_repo, require_tool

ROOT = Path(__file__).parent.parent
PIPELINES = ROOT / "pipelines"
INSTRUMENT = "LSSTCam-imSim"

FAILING = """\
description: fails on the detector named by $BROKEN_DETECTOR
tasks:
  flaky:
    class: wrapper.task.ExternalProgramTask
    config:
      dimensions: [instrument, visit, detector]
      inputs: {calexp: calexp}
      storageClasses: {calexp: ExposureF}
      outputs: {size: calexpSize}
      outputGlobs: {size: size.txt}
      shell: true
      command: >-
        if [ "$BROKEN_DETECTOR" = {dataId.detector} ]; then
        echo "reading {dataId.detector}" >&2; echo "detector {dataId.detector} is broken" >&2; exit 3; fi;
        wc -c < {calexp} > size.txt
"""


# -- fixtures and helpers -------------------------------------------------------------------------


REPO_SHAPE = {"visits": 1, "detectors": 2, "image_size": 128}


@pytest.fixture(scope="module")
def repo(request: pytest.FixtureRequest):
    """A demo repository owned by this module (1 visit x 2 detectors, 128 px)."""
    return make_repo(request, "pipetask", "sqlite", **REPO_SHAPE)


@pytest.fixture(scope="module")
def repo_pg(request: pytest.FixtureRequest):
    """The same with its registry in PostgreSQL."""
    return make_repo(request, "pipetask", "postgresql", **REPO_SHAPE)


@pytest.fixture(params=REGISTRIES)
def any_repo(request: pytest.FixtureRequest):
    """`repo` or `repo_pg`: a test that takes it runs once per registry database."""
    return request.getfixturevalue("repo" if request.param == "sqlite" else "repo_pg")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``TMPDIR`` of the subprocesses: per-quantum workspaces land here."""
    return tmp_path_factory.mktemp("scratch")


def environment(scratch: Path, **extra: str) -> dict[str, str]:
    """The subprocesses' environment: ``scripts/`` and the venv first on ``PATH``."""
    path = os.pathsep.join([str(ROOT / "scripts"), str(BIN), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "TMPDIR": str(scratch), **extra}


def run(
    tool: str, *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / tool), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def pipetask_run(repo, pipeline: Path, output: str, *extra: str, env: dict[str, str]):
    return run(
        "pipetask",
        "run",
        "-b",
        repo.root,
        "-i",
        DEFAULTS,
        "-o",
        output,
        "-p",
        str(pipeline),
        "--register-dataset-types",
        *extra,
        env=env,
    )


def open_butler(repo):
    from lsst.daf.butler import Butler

    return Butler.from_config(repo.root)


def datasets(butler, dataset_type: str, collection: str) -> dict[int, object]:
    """Datasets of a type in a collection, by detector."""
    refs = butler.query_datasets(dataset_type, collection, limit=None, explain=False)
    return {ref.dataId["detector"]: ref for ref in refs}


def read_catalog(path: str):
    from astropy.io import fits

    with fits.open(path) as hdul:
        return hdul[1].data.copy()


def no_workspaces_left(scratch: Path) -> None:
    left = [p.name for p in scratch.iterdir() if p.name.startswith("butlerfs-")]
    assert not left, f"workspaces of successful quanta were not removed: {left}"


@pytest.fixture
def sextractor_run(any_repo, scratch):
    """``pipetask run -j 2`` of pipelines/sextractor.yaml into u/test/sex."""
    require_tool("source-extractor")
    result = ok(
        pipetask_run(
            any_repo, PIPELINES / "sextractor.yaml", "u/test/sex", "-j", "2", env=environment(scratch)
        )
    )
    return result


# -- config and staging, in-process ---------------------------------------------------------------


def make_config(**fields):
    from wrapper.config import ExternalProgramConfig

    config = ExternalProgramConfig()
    config.dimensions = ["instrument", "visit", "detector"]
    config.inputs = {"calexp": "calexp"}
    config.outputs = {"cat": "sextractorCatalog"}
    config.outputGlobs = {"cat": "cat.fits"}
    config.command = "source-extractor '{calexp}[1]' -CATALOG_NAME cat.fits"
    for name, value in fields.items():
        setattr(config, name, value)
    return config


def test_connections_come_from_config():
    from lsst.pipe.base import connectionTypes as cT

    from wrapper.connections import ExternalProgramConnections

    config = make_config(
        dimensions=["instrument", "exposure", "detector"],
        inputs={"raw": "raw"},
        prerequisites={"bias": "bias"},
        storageClasses={"raw": "Exposure", "bias": "ExposureF"},
        connectionDimensions={"bias": "instrument detector"},
        calibrations=["bias"],
        command="toy_isr.py {raw} {bias} out.fits",
    )
    config.validate()
    connections = ExternalProgramConnections(config=config)
    assert set(connections.dimensions) == {"instrument", "exposure", "detector"}
    assert connections.inputs == {"raw"} and connections.prerequisiteInputs == {"bias"}
    assert connections.outputs == {"cat"}
    raw, bias, cat = connections.raw, connections.bias, connections.cat
    assert isinstance(raw, cT.Input) and raw.deferLoad and raw.storageClass == "Exposure"
    assert isinstance(bias, cT.PrerequisiteInput) and bias.isCalibration and bias.deferLoad
    assert set(bias.dimensions) == {"instrument", "detector"}
    assert cat.name == "sextractorCatalog" and cat.storageClass == "ButlerfsFile"
    assert set(cat.dimensions) == {"instrument", "exposure", "detector"}


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"command": "prog {calexpp}"}, "undefined placeholder {calexpp}"),
        ({"command": "prog 'unbalanced"}, "cannot split"),
        ({"command": ""}, "command is empty"),
        ({"outputGlobs": {}}, "output cat has no outputGlobs entry"),
        ({"outputGlobs": {"cat": "../cat.fits"}}, "relative to the working directory"),
        ({"staging": {"calexp": "mount"}}, "'mount' needs a butlerfs mount"),
        ({"staging": {"calexp": "teleport"}}, "unknown mode 'teleport'"),
        ({"staging": {"cat": "copy"}}, "staging: cat is not an input or prerequisite"),
        ({"inputs": {"workdir": "calexp"}}, "'workdir' cannot name a connection"),
        ({"outputs": {"cat": "sex_log"}}, "ends like the task's own"),
        ({"calibrations": ["flat"]}, "calibrations: flat is not an input"),
        ({"environment": ["NO VALUE"]}, "is not NAME=VALUE"),
        ({"network": False, "sandbox": "off"}, "network=False needs the sandbox"),
    ],
)
def test_config_mistakes_are_named(fields, message):
    config = make_config(**fields)
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("(", r"\(")):
        config.validate()


def test_shell_command_and_environment():
    config = make_config(shell=True, command="prog {calexp} | gzip > cat.fits", environment=["A=1", "B=x=y"])
    config.validate()
    assert config.arguments() == ["prog {calexp} | gzip > cat.fits"]
    assert config.environment_variables() == {"A": "1", "B": "x=y"}
    argv = config.template().render({"calexp": "/a b.fits"}, {}, "/w")
    assert argv == ["/bin/sh", "-c", 'prog "${1}" | gzip > cat.fits', "sh", "/a b.fits"]


def fake_handle(uri: str | None, components: dict[str, str] | None = None):
    """A deferred handle whose butler knows one URI (or component URIs)."""
    ref = SimpleNamespace(
        id=uuid.uuid4(),
        datasetType=SimpleNamespace(name="calexp"),
        dataId=SimpleNamespace(required={"visit": 1}),
    )
    uris = SimpleNamespace(primaryURI=uri, componentURIs=components or {})
    return SimpleNamespace(butler=SimpleNamespace(getURIs=lambda r: uris), ref=ref)


@pytest.mark.parametrize(
    "staging, uri, mode, path",
    [
        ("direct", "file:///repo/a/calexp_1.fits", "direct", "/repo/a/calexp_1.fits"),
        ("direct", "s3://bucket/a/calexp_1.fits", "copy", None),  # not POSIX: copied
        ("copy", "file:///repo/a/calexp_1.fits", "copy", "/repo/a/calexp_1.fits"),
        ("uri", "s3://bucket/a/calexp_1.fits", "uri", None),
        ("uri", "file:///repo/z.zip#zip-path=calexp_1.fits", "uri", None),
    ],
)
def test_inputs_staged_from_their_uri(staging, uri, mode, path):
    from wrapper.task import ExternalProgramTask

    task = ExternalProgramTask(config=make_config(staging={"calexp": staging}))
    handle = fake_handle(uri)
    item = task._input_file("calexp", handle)  # type: ignore[arg-type]
    assert (str(item.mode), item.path, item.uri, item.file_name) == (mode, path, uri, "calexp_1.fits")
    assert item.dataset_id == str(handle.ref.id) and item.dataset_type == "calexp"


@pytest.mark.parametrize(
    "handle, message",
    [
        (fake_handle(None, {"image": "file:///i.fits", "mask": "file:///m.fits"}), "one file per component"),
        (fake_handle("file:///repo/z.zip#zip-path=calexp_1.fits"), "member of a Zip archive"),
    ],
)
def test_inputs_that_are_not_one_file_are_refused(handle, message):
    from wrapper.task import ExternalProgramTask, UnsupportedInputError

    task = ExternalProgramTask(config=make_config())
    with pytest.raises(UnsupportedInputError, match=message):
        task._input_file("calexp", handle)  # type: ignore[arg-type]


def test_timeout_fails_the_quantum_in_process(repo, tmp_path):
    from lsst.pipe.base.simple_pipeline_executor import SimplePipelineExecutor

    from wrapper.task import ExternalProgramTimeoutError

    pipeline = tmp_path / "slow.yaml"
    pipeline.write_text(
        FAILING.replace("flaky", "slow").replace("size.txt\n", "size.txt; sleep 30\n")
        + "      timeout: 0.5\n      killGrace: 1\n"
        + f"      workdir: {tmp_path / 'ws'}\n"
    )
    butler = SimplePipelineExecutor.prep_butler(repo.root, inputs=[DEFAULTS], output="u/test/timeout")
    executor = SimplePipelineExecutor.from_pipeline_filename(
        str(pipeline), where=f"instrument = '{INSTRUMENT}' AND detector = 0", butler=butler
    )
    with pytest.raises(ExternalProgramTimeoutError, match=r"timed out after 0.5 s"):
        executor.run(register_dataset_types=True)
    (manifest,) = (tmp_path / "ws").rglob("manifest.json")
    assert '"status": "timeout"' in manifest.read_text()


# -- pipetask run ---------------------------------------------------------------------------------


def test_sextractor_pipeline_catalogs_read_back(any_repo, scratch, sextractor_run):
    repo = any_repo
    from lsst.resources import ResourcePath

    butler = open_butler(repo)
    found = datasets(butler, "sextractorCatalog", "u/test/sex")
    assert sorted(found) == repo.detectors
    for detector, ref in found.items():
        uri = butler.get(ref)
        assert isinstance(uri, ResourcePath) and uri.getExtension() == ".fits"
        rows = read_catalog(uri.ospath)
        assert len(rows) > 10 and {"X_IMAGE", "Y_IMAGE", "FLUX_AUTO"} <= set(rows.names)
        assert rows["X_IMAGE"].max() <= 128.5
        metadata = butler.get("sextractor_metadata", ref.dataId, collections="u/test/sex")
        assert metadata["sextractor"]["status"] == "ok" and metadata["sextractor"]["exit_code"] == 0
        shadowed = detector == repo.shadowed["detector"]
        assert ("calexp-rerun" in metadata["sextractor"]["argv"]) == shadowed, "find-first input"
    assert "exit 0" in sextractor_run.stderr  # the task's own log line, shown as for native tasks
    no_workspaces_left(scratch)


def test_chained_external_native_external(repo, scratch):
    """WPT-003: source-extractor -> a Python PipelineTask -> awk, each reading the previous output."""
    require_tool("source-extractor")
    require_tool("awk")
    ok(pipetask_run(repo, PIPELINES / "chained.yaml", "u/test/chain", env=environment(scratch)))
    butler = open_butler(repo)
    catalogs = datasets(butler, "sextractorCatalog", "u/test/chain")
    bright = datasets(butler, "brightSources", "u/test/chain")
    regions = datasets(butler, "brightRegions", "u/test/chain")
    assert sorted(catalogs) == sorted(bright) == sorted(regions) == repo.detectors
    for detector in repo.detectors:
        fluxes = np.sort(read_catalog(butler.get(catalogs[detector]).ospath)["FLUX_AUTO"])[::-1]
        csv_uri = butler.get(bright[detector])
        assert csv_uri.getExtension() == ".csv"
        rows = list(csv.DictReader(csv_uri.read().decode().splitlines()))
        assert len(rows) == 10
        assert np.allclose([float(r["FLUX_AUTO"]) for r in rows], fluxes[:10], rtol=1e-6)
        reg_uri = butler.get(regions[detector])
        assert reg_uri.getExtension() == ".reg"
        lines = reg_uri.read().decode().splitlines()
        assert lines[:3] == [
            "# Region file format: DS9",
            f"# visit {repo.visits[0]} detector {detector}",
            "image",
        ]
        assert (
            lines[3] == f"circle({rows[0]['X_IMAGE']},{rows[0]['Y_IMAGE']},5) # text={{{rows[0]['NUMBER']}}}"
        )
        assert len(lines) == 13
    no_workspaces_left(scratch)


# -- quantum-backed execution ---------------------------------------------------------------------


def test_isr_quantum_backed(repo, scratch, tmp_path):
    """raw + bias + flat (calibrations) -> toy_isr.py, via qgraph / run-qbb / transfer-from-graph."""
    env = environment(scratch)
    graph = str(tmp_path / "isr.qg")
    ok(
        run(
            "pipetask",
            "qgraph",
            "-b",
            repo.root,
            "-i",
            DEFAULTS,
            "-o",
            "u/test/isr",
            "-p",
            str(PIPELINES / "isr.yaml"),
            "--qgraph-datastore-records",
            "-q",
            graph,
            env=env,
        )
    )
    ok(run("pipetask", "pre-exec-init-qbb", repo.root, graph, env=env))
    ok(run("pipetask", "run-qbb", repo.root, graph, "-j", "2", env=env))
    assert not open_butler(repo).collections.query("u/test/isr*"), "nothing is registered before the transfer"
    transfer = ok(
        run(
            "butler",
            "transfer-from-graph",
            graph,
            repo.root,
            "--register-dataset-types",
            "--update-output-chain",
            env=env,
        )
    )
    assert "no file artifacts exist" not in transfer.stderr + transfer.stdout

    from astropy.io import fits

    butler = open_butler(repo)
    found = datasets(butler, "toyPostIsr", "u/test/isr")
    assert sorted(found) == repo.detectors
    for detector, ref in found.items():
        uri = butler.get(ref)
        assert uri.getExtension() == ".fits"
        # The demo's postISRCCD image is (raw - BIASLVL - bias) * GAIN / flat too.
        expected_ref = butler.find_dataset("postISRCCD", ref.dataId, collections=DEFAULTS)
        expected_uri = butler.getURIs(expected_ref).componentURIs["image"]
        with fits.open(uri.ospath) as ours, fits.open(expected_uri.ospath) as theirs:
            assert ours[0].header["BUNIT"] == "electron" and "CTYPE1" in ours[0].header
            np.testing.assert_allclose(ours[0].data, theirs[0].data, rtol=1e-5, atol=1e-3)
        log = "\n".join(r.message for r in butler.get("isr_log", ref.dataId, collections="u/test/isr"))
        assert f"detector={detector}" in log and "exit 0" in log
    no_workspaces_left(scratch)


# -- BPS ------------------------------------------------------------------------------------------


def test_bps_parsl_local_site(repo, scratch, tmp_path):
    require_tool("source-extractor")
    config = tmp_path / "bps.yaml"
    config.write_text(
        f"""\
pipelineYaml: {PIPELINES / "sextractor.yaml"}
wmsServiceClass: lsst.ctrl.bps.parsl.ParslService
computeSite: local
site:
  local:
    class: lsst.ctrl.bps.parsl.sites.Local
    cores: 2
payload:
  payloadName: sextractor
  butlerConfig: {repo.root}
  inCollection: {DEFAULTS}
  dataQuery: "instrument = '{INSTRUMENT}'"
  output: u/test/bps
submitPath: {tmp_path}/submit/{{outputRun}}
finalJob:
  requestCpus: 1
"""
    )
    ok(run("bps", "submit", str(config), env=environment(scratch), cwd=tmp_path))
    butler = open_butler(repo)
    found = datasets(butler, "sextractorCatalog", "u/test/bps")
    assert sorted(found) == repo.detectors
    for ref in found.values():
        assert len(read_catalog(butler.get(ref).ospath)) > 10
        assert (
            butler.get("sextractor_metadata", ref.dataId, collections="u/test/bps")["sextractor"]["status"]
            == "ok"
        )
    no_workspaces_left(scratch)


# -- failures and reruns --------------------------------------------------------------------------


def test_failure_then_skip_existing_and_clobber_outputs(repo, scratch, tmp_path):
    pipeline = tmp_path / "flaky.yaml"
    pipeline.write_text(FAILING)
    workdir = tmp_path / "ws"
    args = ("-c", f"flaky:workdir={workdir}")

    first = pipetask_run(repo, pipeline, "u/test/flaky", *args, env=environment(scratch, BROKEN_DETECTOR="1"))
    assert first.returncode != 0
    # The task's exception carries the stderr tail; pipe_base logs it and marks the quantum failed.
    assert "ExternalProgramError" in first.stderr and "exit status 3: detector 1 is broken" in first.stderr
    assert "reading 1" in first.stderr and "workspace kept: " in first.stderr
    butler = open_butler(repo)
    sizes = datasets(butler, "calexpSize", "u/test/flaky")
    assert sorted(sizes) == [0]
    (log_ref,) = butler.query_datasets(
        "flaky_log", "u/test/flaky", where=f"instrument = '{INSTRUMENT}' AND detector = 1", explain=False
    )
    failure = "\n".join(r.message for r in butler.get(log_ref))
    assert "detector 1 is broken" in failure and "reading 1" in failure
    (kept,) = workdir.rglob("manifest.json")  # the failed quantum's workspace; the other one is gone
    assert "detector_1" in str(kept) and "/flaky/" in str(kept)
    assert "detector 1 is broken" in (kept.parent / "stderr.txt").read_text()

    rerun = ("--extend-run", "--skip-existing-in", "u/test/flaky", *args)
    blocked = pipetask_run(repo, pipeline, "u/test/flaky", *rerun, env=environment(scratch))
    assert blocked.returncode != 0 and "OutputExistsError" in blocked.stderr  # the failed attempt's log

    again = ok(
        pipetask_run(repo, pipeline, "u/test/flaky", *rerun, "--clobber-outputs", env=environment(scratch))
    )
    assert "1 quanta successfully" in again.stderr  # detector 0 was skipped, not rerun
    butler = open_butler(repo)
    after = datasets(butler, "calexpSize", "u/test/flaky")
    assert sorted(after) == [0, 1] and after[0].id == sizes[0].id
    for detector, ref in after.items():
        calexp = butler.find_dataset("calexp", ref.dataId, collections=DEFAULTS)
        size = os.path.getsize(butler.getURI(calexp).ospath)
        assert int(butler.get(ref).read().decode()) == size, detector
    assert not list(workdir.rglob("manifest.json")), "the rerun's workspace is removed after success"


# -- configuration for repositories without ButlerfsFile -----------------------------------------

PUT_AND_GET = """\
import sys
from lsst.daf.butler import Butler, DatasetType
from butlerfs.formatter import put_source_extension

butler = Butler.from_config(sys.argv[1], writeable=True, run="u/test/plain")
dataset_type = DatasetType("note", [], "ButlerfsFile", universe=butler.dimensions)
butler.registry.registerDatasetType(dataset_type)
with put_source_extension(sys.argv[2]) as uri:
    ref = butler.put(uri, dataset_type, {})
print(butler.get(ref).read().decode())
"""


def test_config_dir_serves_repositories_without_the_storage_class(tmp_path, scratch):
    """``DAF_BUTLER_CONFIG_PATH`` pointing at `write_config_dir` output: put and get work."""
    from lsst.daf.butler import Butler

    from butlerfs.formatter import write_config_dir

    Butler.makeRepo(str(tmp_path / "plain"))  # no ButlerfsFile in its butler.yaml
    source = tmp_path / "note.txt"
    source.write_text("hello")
    script = tmp_path / "put_get.py"
    script.write_text(PUT_AND_GET)
    argv = [str(BIN / "python"), str(script), str(tmp_path / "plain"), str(source)]
    # Importing butlerfs.formatter (the script does) is enough without any config since it installs
    # fallbacks; the config directory still serves processes that do not import it.
    without = subprocess.run(argv, capture_output=True, text=True, env=environment(scratch))
    assert without.returncode == 0 and without.stdout.strip() == "hello", without.stderr
    config_dir = write_config_dir(tmp_path / "butler-config")
    env = environment(scratch, DAF_BUTLER_CONFIG_PATH=str(config_dir))
    Butler.makeRepo(str(tmp_path / "plain2"))
    argv[2] = str(tmp_path / "plain2")
    with_config = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert with_config.returncode == 0, with_config.stderr
    assert with_config.stdout.strip() == "hello"
    assert list((tmp_path / "plain2").rglob("note*.txt")), "the artifact keeps the source's extension"
