"""Bad input: one clear line, a non-zero exit, no traceback, nothing left mounted."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import DEFAULTS, require_fuse, run_cli


def _assert_clean_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _assert_not_mounted(path: Path) -> None:
    out = subprocess.run(["findmnt", "-n", str(path)], capture_output=True, text=True).stdout
    assert not out.strip(), f"{path} was left mounted"


@pytest.fixture
def fuse_ok():
    require_fuse()


def test_repo_missing(mountpoint, fuse_ok, tmp_path):
    result = run_cli("mount", str(tmp_path / "nope"), str(mountpoint), "-c", DEFAULTS)
    _assert_clean_error(result, "not a Butler repository")
    _assert_not_mounted(mountpoint)


def test_not_a_repository(mountpoint, fuse_ok, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_clean_error(
        run_cli("mount", str(empty), str(mountpoint), "-c", DEFAULTS), "not a Butler repository"
    )


def test_unknown_collection(demo, mountpoint, fuse_ok):
    result = run_cli("mount", demo.root, str(mountpoint), "-c", "no/such/collection")
    _assert_clean_error(result, "unknown collection", "no/such/collection")
    _assert_not_mounted(mountpoint)


def test_no_collection(demo, mountpoint, fuse_ok):
    _assert_clean_error(run_cli("mount", demo.root, str(mountpoint)), "--collections")


def test_unknown_dataset_type(demo, mountpoint, fuse_ok):
    result = run_cli("mount", demo.root, str(mountpoint), "-c", DEFAULTS, "-t", "calexpp")
    _assert_clean_error(result, "unknown dataset type", "calexpp")
    _assert_not_mounted(mountpoint)


def test_where_syntax_error(demo, mountpoint, fuse_ok):
    result = run_cli("mount", demo.root, str(mountpoint), "-c", DEFAULTS, "--where", "visit == = 3")
    _assert_clean_error(result, "--where")
    _assert_not_mounted(mountpoint)


def test_mountpoint_missing(demo, tmp_path, fuse_ok):
    _assert_clean_error(run_cli("mount", demo.root, str(tmp_path / "nope"), "-c", DEFAULTS), "does not exist")


def test_mountpoint_not_a_directory(demo, tmp_path, fuse_ok):
    f = tmp_path / "file"
    f.write_text("x")
    _assert_clean_error(run_cli("mount", demo.root, str(f), "-c", DEFAULTS), "not a directory")


def test_mountpoint_not_empty(demo, mountpoint, fuse_ok):
    (mountpoint / "x").write_text("x")
    _assert_clean_error(run_cli("mount", demo.root, str(mountpoint), "-c", DEFAULTS), "not empty")
    (mountpoint / "x").unlink()


def test_mountpoint_already_mounted(mounted, demo):
    result = run_cli("mount", demo.root, mounted.mountpoint, "-c", DEFAULTS)
    _assert_clean_error(result, "already a mount point")
    assert os.listdir(mounted.mountpoint), "the first mount must survive"


def test_no_fuse_device(demo, mountpoint, tmp_path):
    # An environment whose PATH has no fusermount3 stands for a machine without FUSE.
    env = dict(os.environ, PATH=str(tmp_path / "empty-bin"))
    result = run_cli("mount", demo.root, str(mountpoint), "-c", DEFAULTS, env=env)
    _assert_clean_error(result, "fusermount3")


def test_umount_not_mounted(mountpoint):
    _assert_clean_error(run_cli("umount", str(mountpoint)), "not mounted")


def test_cli_mount_umount_round_trip(demo, mountpoint, fuse_ok):
    result = run_cli("mount", demo.root, str(mountpoint), "-c", DEFAULTS, "-t", "calexp", check=True)
    assert "Mounted" in result.stdout
    try:
        assert os.listdir(mountpoint) == ["calexp"]
    finally:
        run_cli("umount", str(mountpoint), check=True)
    _assert_not_mounted(mountpoint)


def test_umount_after_daemon_died(demo, mountpoint, fuse_ok):
    import signal

    run_cli("mount", demo.root, str(mountpoint), "-c", DEFAULTS, check=True)
    from butlerfs.mounting import _state_file

    pid = int(Path(_state_file(str(mountpoint), "pid")).read_text())
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(OSError):
        os.listdir(mountpoint)  # Transport endpoint is not connected
    remount = run_cli("mount", demo.root, str(mountpoint), "-c", DEFAULTS)
    _assert_clean_error(remount, "umount")
    run_cli("umount", str(mountpoint), check=True)
    _assert_not_mounted(mountpoint)


def test_fusermount_refusal_quotes_its_words_the_fix_and_the_log(demo, mountpoint, fuse_ok):
    if os.geteuid() == 0:
        pytest.skip("root may always use allow_other: the CI's user run checks the refusal")
    with open("/etc/fuse.conf") as conf:
        if any(line.strip() == "user_allow_other" for line in conf):
            pytest.skip("this machine allows allow_other to users (user_allow_other in /etc/fuse.conf)")
    result = run_cli("mount", demo.root, str(mountpoint), "-c", DEFAULTS, "--allow-other")
    _assert_clean_error(
        result,
        "fusermount3: option allow_other only allowed if 'user_allow_other' is set in /etc/fuse.conf",
        "add user_allow_other to /etc/fuse.conf",
        "(log: /",
    )
    log = result.stderr.rsplit("(log: ", 1)[1].split(")")[0]
    assert os.path.exists(log)
    _assert_not_mounted(mountpoint)


def test_mount_killed_while_starting_leaves_nothing(demo, mountpoint, fuse_ok):
    """A ``butlerfs mount`` killed before its daemon reported (Ctrl-C, a timeout) leaves no mount.

    The daemon finds nobody to tell that the mount is ready, so it unmounts and exits.
    """
    import psutil
    from conftest import BIN

    cli = subprocess.Popen(
        [str(BIN / "butlerfs"), "mount", demo.root, str(mountpoint), "-c", DEFAULTS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    parent = psutil.Process(cli.pid)
    daemons: list[psutil.Process] = []
    while not daemons and cli.poll() is None:  # the daemon imports the Butler for seconds first
        daemons = parent.children()
        time.sleep(0.01)
    cli.kill()
    out, _ = cli.communicate()
    assert daemons and b"Mounted" not in out, "the daemon reported before the kill: nothing was tested"
    gone, alive = psutil.wait_procs(daemons, timeout=120)
    for process in alive:
        process.kill()
    assert not alive, "the daemon outlived the mount command that started it"
    _assert_not_mounted(mountpoint)
