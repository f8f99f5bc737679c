"""Real mounts for the integration tests: kernel overlayfs and the pyoverlay daemon.

Owns starting and tearing down mounts. Every context manager here unmounts by exact
mount point and ends only the child process it started (by pid), even when the body
raises, so a failing test never leaves a mount or a daemon behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:  # only for the annotation; keeps this module importable on its own
    from treeview import TreeView

#: Kernel options pinned for comparisons; build-time defaults differ between kernels.
KERNEL_PINNED = {"redirect_dir": "off", "index": "off", "metacopy": "off", "xino": "off"}
#: Repository root, put on PYTHONPATH so the daemon runs this working tree's code.
REPO_ROOT = Path(__file__).resolve().parents[2]
MOUNT_TIMEOUT = 30.0
EXIT_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class Side:
    """One mounted copy of a layer set."""

    root: Path
    merged: Path
    lowers: list[Path]
    upper: Path | None
    work: Path | None
    #: Raw snapshots of the lower layers taken before mounting (pyoverlay side only).
    lowers_before: tuple[TreeView, ...] = ()


class MountError(RuntimeError):
    """A mount the test needed could not be made; the message carries the reason."""


def _unescape_mountinfo(field: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as ``\ooo`` octal."""
    out = bytearray()
    raw = field.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        if raw[i : i + 1] == b"\\" and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def mounts_at(path: str | os.PathLike[str]) -> list[str]:
    """Filesystem types mounted exactly at ``path``, oldest first (from mountinfo)."""
    target = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if _unescape_mountinfo(fields[4]) == target:
                found.append(fields[sep + 1])
    return found


def is_mounted(path: str | os.PathLike[str]) -> bool:
    return bool(mounts_at(path))


def _run(cmd: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def umount_exact(path: str | os.PathLike[str], *, fuse: bool) -> None:
    """Unmount whatever we mounted at ``path``; a lazy unmount of that path is the last resort."""
    path = os.path.realpath(path)
    for _ in range(3):
        if not is_mounted(path):
            return
        if fuse:
            _run(["fusermount3", "-u", "--", path])
        else:
            _run(["umount", "--", path])
        if not is_mounted(path):
            return
        time.sleep(0.2)
    if is_mounted(path):
        _run(["umount", "-l", "--", path])


def kernel_options(
    lowers: Sequence[str | os.PathLike[str]],
    upper: str | os.PathLike[str] | None,
    work: str | os.PathLike[str] | None,
    extra_opts: dict[str, str | None] | None = None,
) -> str:
    """The ``-o`` string for a kernel overlay with the pinned options (overridable)."""
    opts: dict[str, str | None] = dict(KERNEL_PINNED)
    extra = dict(extra_opts or {})
    if "userxattr" in extra:
        # The kernel refuses userxattr with redirect_dir=off (which means "follow").
        opts["redirect_dir"] = "nofollow"
    opts.update(extra)
    items = ["lowerdir=" + ":".join(str(p).replace(":", "\\:") for p in lowers)]
    if upper is not None:
        items += [f"upperdir={upper}", f"workdir={work}"]
    items += [k if v is None else f"{k}={v}" for k, v in opts.items()]
    return ",".join(items)


@contextlib.contextmanager
def kernel_overlay(
    lowers: Sequence[str | os.PathLike[str]],
    upper: str | os.PathLike[str] | None,
    work: str | os.PathLike[str] | None,
    merged: str | os.PathLike[str],
    extra_opts: dict[str, str | None] | None = None,
) -> Iterator[Path]:
    """Mount kernel overlayfs at ``merged`` for the duration of the block."""
    options = kernel_options(lowers, upper, work, extra_opts)
    if mounts_at(merged):
        raise MountError(f"{merged} is already a mount point")
    res = _run(["mount", "-t", "overlay", "overlay", "-o", options, "--", str(merged)])
    if res.returncode != 0:
        raise MountError(f"kernel overlay mount failed ({options}): {res.stderr.strip()}")
    try:
        yield Path(merged)
    finally:
        umount_exact(merged, fuse=False)


def pyoverlay_command(args: Sequence[str], *, foreground: bool = True) -> list[str]:
    """argv for ``python -m pyoverlay mount [-f] ARGS``."""
    return [sys.executable, "-m", "pyoverlay", "mount", *(["-f"] if foreground else []), *args]


def daemon_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def end_process(proc: subprocess.Popen[bytes], timeout: float = EXIT_TIMEOUT) -> None:
    """End our own child by pid: SIGTERM, then SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def _read_log(log: IO[bytes]) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode("utf-8", "replace")


def wait_for_fuse_mount(
    proc: subprocess.Popen[bytes], merged: str | os.PathLike[str], timeout: float
) -> bool:
    """True once ``merged`` is a FUSE mount point; False if the child exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(t.startswith("fuse") for t in mounts_at(merged)):
            return True
        if proc.poll() is not None:
            # It may have mounted and exited in the same instant; look once more.
            return any(t.startswith("fuse") for t in mounts_at(merged))
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def pyoverlay_mount(
    args: Sequence[str], merged: str | os.PathLike[str], *, timeout: float = MOUNT_TIMEOUT
) -> Iterator[Path]:
    """Run ``pyoverlay mount -f ARGS`` (ARGS ending in ``merged``) as a child for the block.

    Waits until ``merged`` shows in /proc/self/mountinfo; raises MountError with the
    daemon's stderr if it exits first or takes longer than ``timeout``.
    """
    if mounts_at(merged):
        # A mount left there would look like ours and be torn down as ours.
        raise MountError(f"{merged} is already a mount point")
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            pyoverlay_command(args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=daemon_env(),
            start_new_session=True,
        )
        try:
            if not wait_for_fuse_mount(proc, merged, timeout):
                state = f"exited with {proc.returncode}" if proc.poll() is not None else "hung"
                raise MountError(
                    f"pyoverlay mount {' '.join(args)} {state} without mounting "
                    f"within {timeout}s; output:\n{_read_log(log)}"
                )
            yield Path(merged)
        finally:
            umount_exact(merged, fuse=True)
            # After the unmount the daemon should exit by itself; wait a little first.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=EXIT_TIMEOUT)
            end_process(proc)


def run_mount_expecting_failure(
    args: Sequence[str],
    merged: str | os.PathLike[str],
    *,
    foreground: bool = True,
    timeout: float = 20.0,
) -> tuple[int | None, str, bool]:
    """Run ``pyoverlay mount`` on input that must be refused.

    Returns (exit code or None if it had to be ended, stderr, whether it mounted).
    Whatever it mounted at ``merged`` is unmounted and the child ended before returning,
    so a wrongly accepted input cannot leak a mount.
    """
    before = len(mounts_at(merged)) if os.path.isdir(merged) else 0
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            pyoverlay_command(args, foreground=foreground),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=daemon_env(),
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        mounted = False
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if os.path.isdir(merged) and len(mounts_at(merged)) > before:
                    break
                time.sleep(0.05)
            exited_alone = proc.poll() is not None
        finally:
            mounted = os.path.isdir(merged) and len(mounts_at(merged)) > before
            if mounted:
                _unmount_extra(merged, before)
            end_process(proc)
        return (proc.returncode if exited_alone else None), _read_log(err), mounted


def _unmount_extra(merged: str | os.PathLike[str], keep: int) -> None:
    """Unmount the mounts stacked at ``merged`` above the ``keep`` that were there before."""
    path = os.path.realpath(merged)
    for _ in range(5):
        if len(mounts_at(path)) <= keep:
            return
        if _run(["fusermount3", "-u", "--", path]).returncode != 0:
            _run(["umount", "-l", "--", path])


@contextlib.contextmanager
def tmpfs(path: str | os.PathLike[str], size: str = "4m") -> Iterator[Path]:
    """A small tmpfs at ``path`` (a directory we created), unmounted afterwards."""
    res = _run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", "--", str(path)])
    if res.returncode != 0:
        raise MountError(f"tmpfs mount failed: {res.stderr.strip()}")
    try:
        yield Path(path)
    finally:
        umount_exact(path, fuse=False)
