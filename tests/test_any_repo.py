"""The wrapper task, ``butlerfs run --put`` and readers on a repository butlerfs did not build.

The repository is a plain ``butler create`` (no ``ButlerfsFile`` in its ``butler.yaml``) with an
instrument, two detectors and two FITS images ingested through the Python API, as a user's
own repository would be.  Every subprocess runs without ``DAF_BUTLER_CONFIG_PATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import BIN

COLLECTION = "images/plain"
DETECTORS = (1, 2)

PIPELINE = """\
description: the size of each image, by an external program
tasks:
  size:
    class: wrapper.task.ExternalProgramTask
    config:
      dimensions: [instrument, detector]
      inputs: {image: image}
      storageClasses: {image: ExposureF}
      outputs: {size: imageSize}
      outputGlobs: {size: size.txt}
      shell: true
      command: wc -c < {image} > size.txt
"""

READER = """\
import sys
{preamble}
from lsst.daf.butler import Butler

butler = Butler.from_config(sys.argv[1])
for ref in sorted(butler.query_datasets(sys.argv[2], sys.argv[3], explain=False), key=str):
    print(ref.dataId["detector"], butler.get(ref).read().decode().strip())
"""


def environment(scratch: Path) -> dict[str, str]:
    """The subprocesses' environment: the venv first on ``PATH``, no butler config path."""
    env = {key: value for key, value in os.environ.items() if key != "DAF_BUTLER_CONFIG_PATH"}
    return {**env, "PATH": os.pathsep.join([str(BIN), env.get("PATH", "")]), "TMPDIR": str(scratch)}


def run(
    tool: str, *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / tool), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def make_plain_repo(root: Path, env: dict[str, str]) -> dict[int, int]:
    """``butler create`` + dimension records + ingest of FITS images; returns the file sizes."""
    import numpy as np
    from astropy.io import fits
    from lsst.daf.butler import Butler, DatasetRef, DatasetType, FileDataset, FormatterV2

    class FitsImageFormatter(FormatterV2):
        """Stands in for obs_base's FITS formatter (ingest imports it; nothing here reads)."""

        default_extension: ClassVar[str] = ".fits"

    ok(run("butler", "create", str(root), env=env))
    assert "ButlerfsFile" not in (root / "butler.yaml").read_text()
    butler = Butler.from_config(str(root), writeable=True)
    butler.registry.insertDimensionData(
        "instrument", dict(name="Cam", detector_max=10, visit_max=10, exposure_max=10, class_name="x.Cam")
    )
    butler.registry.insertDimensionData(
        "detector", *[dict(instrument="Cam", id=d, full_name=f"d{d}") for d in DETECTORS]
    )
    image = DatasetType("image", ["instrument", "detector"], "ExposureF", universe=butler.dimensions)
    butler.registry.registerDatasetType(image)
    butler.collections.register(COLLECTION)
    staging = root.parent / "staging"
    staging.mkdir()
    datasets, sizes = [], {}
    for d in DETECTORS:
        path = staging / f"image{d}.fits"
        fits.HDUList([fits.PrimaryHDU(np.full((8 * d, 8), d, dtype=np.float32))]).writeto(path)
        sizes[d] = path.stat().st_size
        ref = DatasetRef(image, butler.registry.expandDataId(instrument="Cam", detector=d), run=COLLECTION)
        datasets.append(FileDataset(path=str(path), refs=[ref], formatter=FitsImageFormatter))
    butler.ingest(*datasets, transfer="copy")
    return sizes


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scratch")


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, scratch: Path):
    root = tmp_path_factory.mktemp("any-repo") / "repo"
    sizes = make_plain_repo(root, environment(scratch))
    pipeline = root.parent / "size.yaml"
    pipeline.write_text(PIPELINE)
    return root, sizes, pipeline


def read_back(root: Path, dataset_type: str, collection: str, env: dict[str, str], preamble: str):
    """``butler.get`` of every dataset from a fresh process: ``{detector: text}``."""
    script = root.parent / "reader.py"
    script.write_text(READER.format(preamble=preamble))
    result = subprocess.run(
        [sys.executable, str(script), str(root), dataset_type, collection],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    if result.returncode:
        return result
    return {int(line.split()[0]): line.split()[1] for line in result.stdout.splitlines()}


def expected(sizes: dict[int, int]) -> dict[int, str]:
    return {d: str(size) for d, size in sizes.items()}


def test_pipetask_run_then_readers(plain, scratch):
    root, sizes, pipeline = plain
    env = environment(scratch)
    args = ["-b", str(root), "-i", COLLECTION, "-o", "u/t/pipetask", "-p", str(pipeline)]
    ok(run("pipetask", "run", *args, "--register-dataset-types", env=env))
    assert "ButlerfsFile" not in (root / "butler.yaml").read_text(), "the repository is left as it was"
    got = read_back(root, "imageSize", "u/t/pipetask", env, "import butlerfs.formatter")
    assert got == expected(sizes)
    # A reader that imports nothing of butlerfs: daf_butler resolves the storage class from config
    # before it imports the formatter the record names, so it cannot know ButlerfsFile.
    bare = read_back(root, "imageSize", "u/t/pipetask", env, "")
    assert isinstance(bare, subprocess.CompletedProcess) and "KeyError: 'ButlerfsFile'" in bare.stderr
    # The butler command knows it (its butlerfs plugin imports the formatter): copying the outputs
    # to another plain repository registers their dataset type there.
    other = root.parent / "other"
    ok(run("butler", "create", str(other), env=env))
    transfer = [
        "transfer-datasets",
        str(root),
        str(other),
        "--collections",
        "u/t/pipetask",
        "-d",
        "imageSize",
    ]
    moved = ok(run("butler", *transfer, "--register-dataset-types", "--transfer", "copy", env=env))
    assert "transferred: 2" in moved.stdout
    from lsst.daf.butler import Butler

    (run_name,) = Butler.from_config(str(other)).collections.query("u/t/pipetask/*")
    assert read_back(other, "imageSize", run_name, env, "import butlerfs.formatter") == expected(sizes)


def test_setup_repo_serves_plain_readers(plain, scratch, tmp_path):
    root, sizes, pipeline = plain
    env = environment(scratch)
    copy = tmp_path / "repo"
    shutil.copytree(root, copy)
    args = ["-b", str(copy), "-i", COLLECTION, "-o", "u/t/setup", "-p", str(pipeline)]
    ok(run("pipetask", "run", *args, "--register-dataset-types", env=env))
    first = ok(run("butlerfs", "setup-repo", str(copy), env=env))
    assert "now defines" in first.stdout
    again = ok(run("butlerfs", "setup-repo", str(copy), env=env))
    assert "already defines" in again.stdout
    assert read_back(copy, "imageSize", "u/t/setup", env, "") == expected(sizes)
    missing = run("butlerfs", "setup-repo", str(tmp_path / "nowhere"), env=env)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "no butler.yaml" in missing.stderr


def test_quantum_backed_run(plain, scratch, tmp_path):
    root, sizes, pipeline = plain
    env = environment(scratch)
    graph = str(tmp_path / "size.qg")
    args = ["-b", str(root), "-i", COLLECTION, "-o", "u/t/qbb", "-p", str(pipeline)]
    ok(run("pipetask", "qgraph", *args, "--qgraph-datastore-records", "-q", graph, env=env))
    ok(run("pipetask", "pre-exec-init-qbb", str(root), graph, env=env))
    ok(run("pipetask", "run-qbb", str(root), graph, env=env))
    transfer = ["transfer-from-graph", graph, str(root), "--register-dataset-types", "--update-output-chain"]
    ok(run("butler", *transfer, env=env))
    assert read_back(root, "imageSize", "u/t/qbb", env, "import butlerfs.formatter") == expected(sizes)
    artifacts = list((root / "u" / "t" / "qbb").rglob("imageSize_*"))
    assert len(artifacts) == 2 and all(p.suffix == ".txt" for p in artifacts)


def test_butlerfs_run_put(plain, scratch, tmp_path):
    root, sizes, _ = plain
    env = environment(scratch)
    result = run(
        "butlerfs",
        "run",
        str(root),
        "-c",
        COLLECTION,
        "--workdir",
        str(tmp_path / "work"),
        "-i",
        "image=image",
        "-o",
        "size=size.txt:runSize",
        "--output-run",
        "u/t/run",
        "--put",
        "--shell",
        "--",
        "wc -c < {image} > size.txt",
        env=env,
    )
    ok(result)
    assert read_back(root, "runSize", "u/t/run", env, "import butlerfs.formatter") == expected(sizes)


def test_bps_parsl_local_site(plain, scratch, tmp_path):
    """BPS: the graph built in ``bps submit``, jobs ``pipetask run-qbb``, the final transfer job."""
    root, sizes, pipeline = plain
    config = tmp_path / "bps.yaml"
    config.write_text(
        f"""\
pipelineYaml: {pipeline}
wmsServiceClass: lsst.ctrl.bps.parsl.ParslService
computeSite: local
site:
  local:
    class: lsst.ctrl.bps.parsl.sites.Local
    cores: 2
payload:
  payloadName: size
  butlerConfig: {root}
  inCollection: {COLLECTION}
  dataQuery: "instrument = 'Cam'"
  output: u/t/bps
submitPath: {tmp_path}/submit/{{outputRun}}
finalJob:
  requestCpus: 1
"""
    )
    ok(run("bps", "submit", str(config), env=environment(scratch), cwd=tmp_path))
    assert read_back(root, "imageSize", "u/t/bps", environment(scratch), "import butlerfs.formatter") == (
        expected(sizes)
    )
