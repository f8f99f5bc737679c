"""The daemon's life: background start, unmount, mount.fuse3, debug log, EIO.

(SIGTERM and SIGINT are covered in test_read_view.py::test_signal_unmounts_cleanly.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.mounts import daemon_env, is_mounted, pyoverlay_mount, umount_exact

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def example(tmp_path: Path) -> Path:
    for name in ("lower", "upper", "work", "merged"):
        (tmp_path / name).mkdir()
    (tmp_path / "lower" / "both.txt").write_text("I am from lower\n")
    (tmp_path / "lower" / "in_lower.txt").write_text("I am from lower\n")
    (tmp_path / "upper" / "both.txt").write_text("I am from upper\n")
    (tmp_path / "upper" / "in_upper.txt").write_text("I am from upper\n")
    return tmp_path


def layer_args(root: Path) -> list[str]:
    return [str(root / n) for n in ("lower", "upper", "work", "merged")]


def pyoverlay(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyoverlay", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env or daemon_env(),
        check=False,
    )


@contextlib.contextmanager
def background_daemon(root: Path, *extra: str) -> Iterator[int]:
    """Mount in the background (the default) and yield the daemon's pid."""
    pid_file = root / "daemon.pid"
    merged = root / "merged"
    result = pyoverlay("mount", "--pid-file", str(pid_file), *extra, *layer_args(root))
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    try:
        assert result.returncode == 0, result.stderr
        assert pid is not None
        yield pid
    finally:
        umount_exact(merged, fuse=True)
        if pid is not None:
            _wait_gone(pid)


def _wait_mounted(merged: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(merged) and time.monotonic() < deadline:
        time.sleep(0.05)


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)  # our own daemon, by the pid it reported
    raise AssertionError(f"daemon {pid} did not exit after unmount")


def test_background_mount_is_live_when_the_command_returns(example: Path) -> None:
    with background_daemon(example) as pid:
        merged = example / "merged"
        assert is_mounted(merged)
        assert (merged / "both.txt").read_text() == "I am from upper\n"
        assert (merged / "in_lower.txt").read_text() == "I am from lower\n"
        assert os.kill(pid, 0) is None
        result = pyoverlay("umount", str(merged))
        assert result.returncode == 0, result.stderr
        assert not is_mounted(merged)
        _wait_gone(pid)


def test_fstab_form_mounts_through_mount_fuse3(example: Path, tmp_path: Path) -> None:
    script_dir = Path(sys.executable).parent
    if not (script_dir / "pyoverlay").exists():
        pytest.fail(f"the pyoverlay console script is not installed next to {sys.executable}")
    env = daemon_env()
    env["PATH"] = f"{script_dir}:{env.get('PATH', '/usr/bin:/bin')}"
    merged = example / "merged"
    opts = (
        f"lowerdir={example / 'lower'},upperdir={example / 'upper'},"
        f"workdir={example / 'work'},rw,relatime,nodev"
    )
    # mount(8) runs /sbin/mount.fuse3 with a fixed PATH, so call the helper itself with
    # ours: it is what turns `mount -t fuse.pyoverlay` and fstab lines into our argv.
    result = subprocess.run(
        ["mount.fuse3", "pyoverlay", str(merged), "-t", "pyoverlay", "-o", opts],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    try:
        assert result.returncode == 0, result.stderr
        assert (merged / "in_upper.txt").read_text() == "I am from upper\n"
        st = os.statvfs(merged)
        assert st.f_flag & os.ST_NODEV, "nodev from the fstab options was not applied"
    finally:
        umount_exact(merged, fuse=True)
    assert not is_mounted(merged)


def test_debug_logs_one_line_per_request(example: Path, tmp_path: Path) -> None:
    merged = example / "merged"
    log = tmp_path / "daemon.log"
    with (
        open(log, "wb") as out,
        subprocess.Popen(
            [sys.executable, "-m", "pyoverlay", "mount", "-f", "--debug", *layer_args(example)],
            env=daemon_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        ) as proc,
    ):
        try:
            _wait_mounted(merged)
            os.stat(merged / "in_lower.txt")
        finally:
            umount_exact(merged, fuse=True)
            proc.wait(timeout=20)
    text = log.read_text()
    assert "lookup(1, b'in_lower.txt')" in text


def test_unexpected_exception_is_eio_and_daemon_keeps_serving(example: Path) -> None:
    env = daemon_env()
    env["PYOVERLAY_INJECT_FAULT"] = "boom"
    (example / "lower" / "boom").write_text("x")
    merged = example / "merged"
    with _mount_with_env(example, env):
        with pytest.raises(OSError) as info:
            os.stat(merged / "boom")
        assert info.value.errno == errno.EIO
        assert (merged / "both.txt").read_text() == "I am from upper\n"
        (merged / "after").write_text("still serving")
        assert (example / "upper" / "after").read_text() == "still serving"


@contextlib.contextmanager
def _mount_with_env(root: Path, env: dict[str, str]) -> Iterator[None]:
    merged = root / "merged"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyoverlay", "mount", "-f", *layer_args(root)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_mounted(merged)
        assert is_mounted(merged)
        yield
    finally:
        umount_exact(merged, fuse=True)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    assert "unexpected error in lookup" in proc.stderr.read().decode()


def test_umount_of_something_else_is_refused(tmp_path: Path) -> None:
    result = pyoverlay("umount", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "not mounted" in result.stderr
    assert "Traceback" not in result.stderr


def test_background_failure_reports_the_reason(example: Path) -> None:
    (example / "work" / "junk").write_text("x")
    result = pyoverlay("mount", *layer_args(example))
    assert result.returncode == 1
    assert result.stderr.strip().endswith("not empty (contains 'junk')")
    assert not is_mounted(example / "merged")


def test_read_only_mount_with_one_lower_writes_nothing(example: Path) -> None:
    before = sorted(p.name for p in (example / "lower").iterdir())
    merged = example / "merged"
    with pyoverlay_mount(["--read-only", str(example / "lower"), str(merged)], merged):
        with pytest.raises(OSError) as info:
            (merged / "new").write_text("x")
        assert info.value.errno == errno.EROFS
        assert (merged / "in_lower.txt").read_text() == "I am from lower\n"
    assert sorted(p.name for p in (example / "lower").iterdir()) == before
    assert shutil.which("fusermount3")
