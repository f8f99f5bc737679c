"""Shared pieces of the reliability tests: a daemon we can kill, tree fingerprints, records.

Owns the life cycle of a pyoverlay daemon whose pid the test knows (so it can be killed
with SIGKILL and its fds and memory read from /proc), a fingerprint of a directory tree
(content hashes, modes, owners, xattrs, mtimes) and the JSON-lines log that bench/soak.py
turns into the table in docs/reliability.md. Mount helpers come from mounts.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from mounts import (
    EXIT_TIMEOUT,
    MountError,
    daemon_env,
    end_process,
    is_mounted,
    mounts_at,
    pyoverlay_command,
    umount_exact,
)

#: Where tests append what they tried and lost (set by bench/soak.py; unset = no log).
LOG_ENV = "PYOVERLAY_RELIABILITY_LOG"


@dataclasses.dataclass(frozen=True)
class Layout:
    """The directories of one writable overlay."""

    root: Path
    lowers: list[Path]
    upper: Path
    work: Path
    merged: Path

    def args(self) -> list[str]:
        lower = ":".join(str(p) for p in self.lowers)
        return [lower, str(self.upper), str(self.work), str(self.merged)]


def make_layout(root: Path, lowers: int = 2) -> Layout:
    root.mkdir(parents=True, exist_ok=True)
    names = [f"lower{i}" for i in range(lowers)]
    for name in [*names, "upper", "work", "merged"]:
        (root / name).mkdir(exist_ok=True)
    return Layout(root, [root / n for n in names], root / "upper", root / "work", root / "merged")


class Daemon:
    """``pyoverlay mount -f`` as our child: mounted on enter, torn down on exit.

    :meth:`kill` sends SIGKILL to exactly this child; :meth:`close` unmounts the mount
    point (``fusermount3 -u``, then ``umount -l`` of that path) and reaps the child.
    """

    def __init__(self, args: Sequence[str], merged: Path, timeout: float = 30.0):
        self.args = list(args)
        self.merged = merged
        self.timeout = timeout
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Daemon:
        self.proc = subprocess.Popen(
            pyoverlay_command(self.args),
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=daemon_env(),
            start_new_session=True,
        )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if any(t.startswith("fuse") for t in mounts_at(self.merged)):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.close()
        raise MountError(f"pyoverlay {' '.join(self.args)} did not mount:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL our daemon: no clean-up code of its own runs."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            assert self.proc is not None
            self.proc.wait(timeout=EXIT_TIMEOUT)

    def close(self) -> None:
        # A dead daemon leaves its mount point answering ENOTCONN; unmount that exact path.
        umount_exact(self.merged, fuse=True)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=EXIT_TIMEOUT)
            end_process(self.proc)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
        self.log.close()


def mount_layout(layout: Layout, *extra: str) -> Daemon:
    """A started daemon for ``layout`` (use as a context manager)."""
    return Daemon([*extra, *layout.args()], layout.merged)


# -- process measurements ------------------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def drop_caches() -> None:
    """Make the kernel forget dentries and inodes (FUSE FORGETs follow)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


# -- tree fingerprints ---------------------------------------------------------------------


def _xattrs(path: str) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in sorted(names):
        with contextlib.suppress(OSError):
            out[name] = os.getxattr(path, name, follow_symlinks=False).hex()
    return out


def _content_hash(path: str) -> str:
    h = hashlib.sha256()
    # O_NOATIME: taking the fingerprint must not change the atime it records.
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(root: Path, *, atime: bool = False) -> dict[str, tuple]:
    """Every object under ``root`` (root itself included): type, mode, owner, size, rdev,
    content hash or link target, xattrs and mtime (and, if asked, the atime of everything
    but symlinks)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [".", *sorted(dirnames), *sorted(filenames)]:
            full = os.path.join(dirpath, name) if name != "." else dirpath
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                what = _content_hash(full)
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(full)
            else:
                what = ""
            rel = os.path.relpath(full, root)
            out[rel] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                st.st_rdev,
                what,
                tuple(_xattrs(full).items()),
                st.st_mtime_ns,
                # readlink(2) itself sets a symlink's atime: only other objects' count
                st.st_atime_ns if atime and not stat.S_ISLNK(st.st_mode) else 0,
            )
    return out


def diff_fingerprints(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """Human-readable differences, empty when identical."""
    lines = []
    for path in sorted(set(before) | set(after)):
        a, b = before.get(path), after.get(path)
        if a != b:
            lines.append(f"{path}: {a} -> {b}")
    return lines


# -- the record bench/soak.py reads --------------------------------------------------------


def record(item: str, what: str, tried: int, lost: int, detail: str = "") -> None:
    """Append one line of results for docs/reliability.md (if a log was asked for)."""
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    line = {"item": item, "what": what, "tried": tried, "lost": lost, "detail": detail}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


@contextlib.contextmanager
def loop_device(image: Path, *, direct_io: bool = False) -> Iterator[str]:
    """Attach ``image`` to a free loop device for the block; detach that device after."""
    cmd = ["losetup", "-f", "--show"]
    if direct_io:
        cmd.append("--direct-io=on")
    res = subprocess.run([*cmd, str(image)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise MountError(f"losetup failed: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


@contextlib.contextmanager
def block_mount(dev: str, path: Path, options: str = "") -> Iterator[Path]:
    """Mount block device ``dev`` at ``path`` for the block; unmount exactly that path."""
    cmd = ["mount", *(["-o", options] if options else []), dev, str(path)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise MountError(f"mount {dev} failed: {res.stderr.strip()}")
    try:
        yield path
    finally:
        umount_exact(path, fuse=False)


__all__ = [
    "Daemon",
    "Layout",
    "MountError",
    "block_mount",
    "diff_fingerprints",
    "drop_caches",
    "fd_count",
    "fingerprint",
    "is_mounted",
    "loop_device",
    "make_layout",
    "mount_layout",
    "record",
    "rss_kib",
]
