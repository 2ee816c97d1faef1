"""Overlay modes: ``auto``'s order as root and as a user, and the kernel overlay in the program's
own mount namespace (a user namespace too when not root).

The same tests run in CI's root run and in its unprivileged run: ``auto`` must pick the kernel
overlay in both (a plain mount namespace for root, a user namespace mapping the user to itself
otherwise), changes must be read from ``upper/`` outside, and a kernel overlay that cannot be
made must say why in one line. Machines where no user namespace can be made are simulated with
bubblewrap's ``--disable-userns`` (and ``--cap-drop ALL`` for root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BIN, DEFAULTS, IN_CI, require, require_fuse, require_tool

from wrapper.workspace import OverlayMode, Staging, Workspace, probe_overlay

pytestmark = pytest.mark.fuse


def userns_problem() -> str | None:
    """Why this process cannot make a user namespace (`None`: it can)."""
    result = subprocess.run(["unshare", "--user", "true"], capture_output=True, text=True)
    return None if result.returncode == 0 else result.stderr.strip()


def require_kernel_overlay() -> None:
    """Root always may; a user needs unprivileged user namespaces (CI's machine has them)."""
    if os.geteuid() != 0:
        problem = userns_problem()
        require(problem is None, f"unprivileged user namespaces ({problem})")


def without_userns(argv: list[str]) -> list[str]:
    """``argv`` in a bubblewrap sandbox that may not make user namespaces (nor, as root, mount)."""
    bwrap = require_tool("bwrap")
    return [
        bwrap,
        "--dev-bind",
        "/",
        "/",
        "--unshare-user",
        "--disable-userns",
        "--cap-drop",
        "ALL",
        "--",
        *argv,
    ]


def run_in_work(demo, work: Path, *args: str, wrap=None) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN / "butlerfs"), "run", demo.root, "-c", DEFAULTS, "--workdir", str(work), *args]
    return subprocess.run(wrap(argv) if wrap else argv, capture_output=True, text=True, timeout=180)


def manifests(work: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(work.glob("instrument_*/detector_*/*/manifest.json"))]


def test_auto_prefers_the_kernel_overlay(tmp_path):
    require_kernel_overlay()
    assert probe_overlay(tmp_path, "auto") == (OverlayMode.KERNEL, "")
    assert not list(tmp_path.iterdir()), "the probe left something behind"


def test_auto_without_user_namespaces_falls_back_with_every_cause(tmp_path):
    require_tool("fuse-overlayfs")
    code = (
        "import sys; from wrapper.workspace import probe_overlay; "
        "mode, problems = probe_overlay(sys.argv[1], 'auto'); print(mode); print(problems)"
    )
    result = subprocess.run(
        without_userns([sys.executable, "-c", code, str(tmp_path)]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    mode, problems = result.stdout.splitlines()
    # Neither a user namespace nor (setuid fusermount3 does not work in the sandbox's) a FUSE
    # mount: links, and the reason of each mode tried before, in order.
    assert mode == "links", result.stdout
    kernel, fuse = problems.split("; ")
    assert kernel.startswith("kernel: unshare(CLONE_NEWUSER|CLONE_NEWNS): "), problems
    assert "user.max_user_namespaces" in kernel, problems
    assert fuse.startswith("fuse: fuse-overlayfs: "), problems


def test_auto_takes_fuse_when_the_kernel_overlay_does_not_work(tmp_path, monkeypatch):
    require_tool("fuse-overlayfs")
    require_fuse()
    from wrapper import workspace

    # The kernel's answer for this filesystem, as a failed probe would have cached it.
    monkeypatch.setitem(workspace._kernel_problems, os.stat(tmp_path).st_dev, "no user namespaces")
    (tmp_path / "in").mkdir()
    ws = Workspace(tmp_path / "ws")
    with ws.staged([], "auto") as staging:
        assert staging.overlay is OverlayMode.FUSE and staging.kernel_options is None
        assert os.path.ismount(ws.merged)
    assert not os.path.ismount(ws.merged)


def test_overlay_kernel_that_cannot_work_says_why_in_one_line(demo, tmp_path):
    work = tmp_path / "work"
    result = run_in_work(
        demo,
        work,
        "-i",
        "img=calexp:direct",
        "--overlay",
        "kernel",
        "--sandbox",
        "off",
        "--",
        "true",
        wrap=without_userns,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert (
        f"--overlay kernel does not work in {work}: kernel: unshare(CLONE_NEWUSER|CLONE_NEWNS): " in lines[0]
    )
    assert "sysctl user.max_user_namespaces" in lines[0]
    assert not list(work.glob("instrument_*")), "something ran"


# A program that looks at its namespace and changes its inputs every way overlayfs records:
# edits raw in place (copy-up), deletes bias (whiteout), replaces flat by a directory (opaque).
EDITS = """\
import os, sys
raw, bias, flat = sys.argv[1:4]
def put(name, text):
    with open(name, "w") as out:
        out.write(f"{text}\\n")
put("ns.txt", os.readlink("/proc/self/ns/mnt"))
put("uid.txt", os.getuid())
put("caps.txt", next(line.split()[1] for line in open("/proc/self/status") if line.startswith("CapEff:")))
cwd = os.getcwd()
mounts = [line.split(" - ")[1].split()[0] for line in open("/proc/self/mountinfo") if line.split()[4] == cwd]
put("fstype.txt", " ".join(mounts))
with open(raw, "r+b") as stream:
    stream.seek(80)
    stream.write(b"EDITED")
os.remove(bias)
os.remove(flat)
os.mkdir(flat)
put(os.path.join(flat, "inside.txt"), "inside")
"""


@pytest.mark.parametrize("overlay", ["auto", "fuse"])
def test_program_changes_read_from_upper(demo, tmp_path, overlay):
    script = tmp_path / "edits.py"
    script.write_text(EDITS)
    require_fuse()
    if overlay == "auto":
        require_kernel_overlay()
    else:
        require_tool("fuse-overlayfs")
    work = tmp_path / "work"
    result = run_in_work(
        demo, work, "-i", "raw=raw", "-i", "bias=bias", "-i", "flat=flat",
        "-w", "instrument = 'LSSTCam-imSim' AND detector = 1", "--overlay", overlay, "--sandbox", "off",
        "--", sys.executable, str(script), "{raw}", "{bias}", "{flat}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    found = manifests(work)
    assert found
    for m in found:
        assert m["status"] == "ok" and m["overlay"] == ("kernel" if overlay == "auto" else "fuse"), m
        ws = Path(m["workspace"])
        names = {i["name"]: Path(i["given"]).name for i in m["inputs"]}
        expected = [
            "caps.txt",
            f"{names['flat']}/inside.txt",
            "fstype.txt",
            "ns.txt",
            names["raw"],
            "uid.txt",
        ]
        assert m["undeclared"] == sorted(expected), m["undeclared"]
        assert int((ws / "upper" / "uid.txt").read_text()) == os.getuid()
        assert (ws / "upper" / names["raw"]).stat().st_uid == os.getuid()
        assert (ws / "upper" / "fstype.txt").read_text().split() == [
            "overlay" if overlay == "auto" else "fuse.fuse-overlayfs"
        ]
        assert not os.path.ismount(ws / "merged")
        if overlay == "auto":
            # The program's own mount namespace; as a user without the namespace's capabilities.
            assert (ws / "upper" / "ns.txt").read_text().strip() != os.readlink("/proc/self/ns/mnt")
            if os.geteuid() != 0:
                assert int((ws / "upper" / "caps.txt").read_text(), 16) == 0
    # The repository's files are untouched (raw was edited in a copy-up only).
    from lsst.daf.butler import Butler

    butler = Butler.from_config(demo.root)
    where = "instrument = 'LSSTCam-imSim' AND detector = 1"
    raw = butler.query_datasets("raw", DEFAULTS, where=where, limit=None, explain=False)[0]
    assert b"EDITED" not in Path(butler.getURI(raw).ospath).read_bytes()[:200]


def test_whiteout_forms_are_not_changes(tmp_path):
    ws = Workspace(tmp_path / "ws")
    ws.reset()
    (ws.upper / "new.txt").write_text("x\n")
    (ws.upper / "empty.txt").touch()
    xwhiteout = ws.upper / "xwhiteout"
    xwhiteout.touch()
    try:
        os.setxattr(xwhiteout, "user.overlay.whiteout", b"")
    except OSError as err:
        if IN_CI:
            raise
        pytest.skip(f"no user extended attributes on {tmp_path}: {err.strerror}")
    opaque = ws.upper / "dir"
    opaque.mkdir()
    os.setxattr(opaque, "user.overlay.opaque", b"y")
    (opaque / "in.txt").write_text("y\n")
    (ws.upper / ".wh.gone").touch()
    kernel = ws.changed_files(Staging(OverlayMode.KERNEL, []))
    assert kernel == [".wh.gone", "dir/in.txt", "empty.txt", "new.txt"]
    assert ws.changed_files(Staging(OverlayMode.FUSE, [])) == ["dir/in.txt", "empty.txt", "new.txt"]
    shutil.rmtree(ws.root)
