"""The mount daemon's choice of lookup implementation, seen from outside.

A default mount runs the C helper: the daemon has ``pyoverlay._native`` mapped, and
strace on the daemon shows its system calls (``openat2`` for listings, ``flistxattr``
with the C helper's buffer size for a new directory) while a client looks around.
``PYOVERLAY_NATIVE=0`` in the environment reaches the daemon, which then runs the Python
reference: no extension mapped, none of those calls. Finally the read-view comparison
with kernel overlayfs (test_read_view.py) runs again, whole, with the Python reference.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounts import REPO_ROOT, end_process, pyoverlay_mount

IMPLEMENTATIONS = ["native", "python"]


def _layers(root: Path) -> list[str]:
    """Three lowers and an upper with merged directories; returns mount arguments."""
    for i in range(3):
        for d in ("shared", f"shared/sub{i}", "fresh", "fresh/inner"):
            (root / f"l{i}" / d).mkdir(parents=True, exist_ok=True)
        (root / f"l{i}" / "shared" / f"file{i}").write_text(f"{i}\n")
        (root / f"l{i}" / "fresh" / f"f{i}").write_text(f"{i}\n")
    for d in ("upper", "work", "merged"):
        (root / d).mkdir()
    lower = ":".join(str(root / f"l{i}") for i in range(3))
    return [lower, str(root / "upper"), str(root / "work"), str(root / "merged")]


@contextlib.contextmanager
def strace(pid: int, log: Path) -> Iterator[None]:
    """strace (our own child) attached to every thread of ``pid`` for the block."""
    proc = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=openat2,flistxattr", "-o", str(log), "-p", str(pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while _tracer(pid) != proc.pid and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _tracer(pid) == proc.pid, "strace did not attach"
        yield
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # detaches cleanly
        end_process(proc)


def _tracer(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def _env_for(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if impl == "python":
        monkeypatch.setenv("PYOVERLAY_NATIVE", "0")  # mounts.daemon_env copies os.environ
    else:
        monkeypatch.delenv("PYOVERLAY_NATIVE", raising=False)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_daemon_runs_the_chosen_implementation(
    tmp_path: Path, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _env_for(impl, monkeypatch)
    args = _layers(tmp_path)
    pid_file = tmp_path / "daemon.pid"
    merged = tmp_path / "merged"
    log = tmp_path / "strace.log"
    with pyoverlay_mount(["--pid-file", str(pid_file), *args], merged):
        pid = int(pid_file.read_text())
        with open(f"/proc/{pid}/maps") as f:
            mapped = "pyoverlay/_native" in f.read()
        with strace(pid, log):
            listing = sorted(os.listdir(merged / "fresh"))
            inner = os.stat(merged / "fresh" / "inner")
        assert sorted(os.listdir(merged / "shared")) == [
            "file0", "file1", "file2", "sub0", "sub1", "sub2",
        ]  # fmt: skip
    calls = log.read_text()
    assert listing == ["f0", "f1", "f2", "inner"]
    assert inner.st_nlink == 1  # a merged directory
    if impl == "native":
        assert mapped
        assert "openat2(" in calls, calls  # merged_names re-opens each layer copy so
        assert ", 1024)" in calls, calls  # flistxattr with the C helper's stack buffer
    else:
        assert not mapped
        assert "openat2(" not in calls, calls
        assert "flistxattr(" in calls and ", 1024)" not in calls, calls


def _pytest(args: list[str], native_env: str | None, cwd: Path) -> tuple[str, set[str]]:
    """Run pytest on ``args``; its output and the node ids that failed or errored."""
    env = dict(os.environ)
    env.pop("PYOVERLAY_NATIVE", None)
    if native_env is not None:
        env["PYOVERLAY_NATIVE"] = native_env
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *args],
        env=env, capture_output=True, text=True, timeout=880, cwd=cwd,
    )  # fmt: skip
    failed = {
        line.split(" ", 1)[1].split(" - ", 1)[0]
        for line in res.stdout.splitlines()
        if line.startswith(("FAILED ", "ERROR "))
    }
    assert res.returncode in (0, 1), res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout, failed


@pytest.mark.timeout(900)
def test_read_view_suite_with_python_reference(tmp_path: Path) -> None:
    """The whole kernel comparison again, every daemon on the Python reference.

    Whatever fails here must fail with the C helper too: a test that only the Python
    reference fails is a difference between the two implementations.
    """
    suite = str(REPO_ROOT / "tests" / "integration" / "test_read_view.py")
    out, failed = _pytest([suite], "0", tmp_path)
    assert " passed" in out, out[-3000:]
    if failed:
        rerun = [str(REPO_ROOT / node) for node in sorted(failed)]
        _, failed_native = _pytest(rerun, None, tmp_path)
        assert sorted(failed - failed_native) == [], out[-4000:]
