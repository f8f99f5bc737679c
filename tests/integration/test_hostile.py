"""Hostile layers: symlinks and special files never lead the daemon outside the layers.

The layers hold absolute, relative and ``..``-chain symlinks to a directory outside them,
a lower symlink under an upper directory of the same name (and the reverse), FIFOs and
device nodes. The same layers are mounted with kernel overlayfs and with pyoverlay, and
the write path is driven through each mount (copy-up of symlinks and special files,
create, mkdir, rename into and out of such paths, unlink, link). Then:

- the merged trees and every answer equal the kernel's;
- the directory outside is unchanged (fingerprint), and fanotify saw the daemon's
  process open, read, list or modify nothing in it.

At mount time, layers that overlap each other (also through a symlink or a bind mount)
and a mount point inside a layer are refused with one line and nothing mounted.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mounts import kernel_overlay, mounts_at, run_mount_expecting_failure, umount_exact
from reliability_util import Daemon, diff_fingerprints, fingerprint, record

# -- fanotify: who touched the outside directory -------------------------------------------

_FAN_CLOEXEC, _FAN_NONBLOCK = 0x1, 0x2
_FAN_ACCESS, _FAN_MODIFY, _FAN_CLOSE_WRITE, _FAN_OPEN = 0x1, 0x2, 0x8, 0x20
_FAN_ONDIR, _FAN_EVENT_ON_CHILD, _FAN_MARK_ADD = 0x40000000, 0x08000000, 0x1
_EVENT = struct.Struct("IBBHQii")


class Watcher:
    """fanotify marks on every directory and file of a tree; events carry the pid."""

    def __init__(self, root: Path):
        self._libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self._libc.fanotify_mark.argtypes = [
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint64,
            ctypes.c_int,
            ctypes.c_char_p,
        ]
        self.fd = self._libc.fanotify_init(_FAN_CLOEXEC | _FAN_NONBLOCK, os.O_RDONLY)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "fanotify_init")
        mask = _FAN_ACCESS | _FAN_MODIFY | _FAN_CLOSE_WRITE | _FAN_OPEN
        mask |= _FAN_ONDIR | _FAN_EVENT_ON_CHILD
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [".", *dirnames, *filenames]:
                path = os.path.join(dirpath, name).encode()
                if self._libc.fanotify_mark(self.fd, _FAN_MARK_ADD, mask, -100, path) != 0:
                    raise OSError(ctypes.get_errno(), "fanotify_mark", path)
        self.pids: list[int] = []

    def drain(self) -> list[int]:
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return self.pids
            off = 0
            while off < len(buf):
                length, _, _, _, _, event_fd, pid = _EVENT.unpack_from(buf, off)
                if event_fd >= 0:
                    os.close(event_fd)
                self.pids.append(pid)
                off += length

    def close(self) -> None:
        os.close(self.fd)


# -- the layers ----------------------------------------------------------------------------


def build(root: Path, outside: Path) -> None:
    """Layers full of ways out, pointing at ``outside``."""
    top, bottom, upper = root / "lower0", root / "lower1", root / "upper"
    for d in (top, bottom, upper, root / "work", root / "merged"):
        d.mkdir(parents=True)
    depth = "../" * (len(root.parts) + 4)
    # symlinks of every shape in the bottom layer
    os.symlink(str(outside), bottom / "abs_link")
    os.symlink(os.path.relpath(outside, bottom), bottom / "rel_link")
    os.symlink(depth + str(outside).lstrip("/"), bottom / "dotdot_chain")
    os.symlink(str(outside / "canary"), bottom / "file_link")
    (bottom / "sub").mkdir()
    os.symlink("../" * 12 + str(outside).lstrip("/"), bottom / "sub" / "esc")
    (bottom / "sub" / "plain").write_text("plain\n")
    # a symlink in the top lower hides a directory of the same name below it
    (bottom / "d").mkdir()
    (bottom / "d" / "below").write_text("below\n")
    os.symlink(str(outside), top / "d")
    # a directory in the top lower; a symlink of that name below must not merge
    (top / "sub2").mkdir()
    (top / "sub2" / "x").write_text("x\n")
    os.symlink(str(outside), bottom / "sub2")
    # upper has a directory where a lower has a symlink (and the reverse)
    os.symlink(str(outside), top / "up_dir")
    (upper / "up_dir").mkdir()
    (upper / "up_dir" / "kept").write_text("kept\n")
    (bottom / "low_dir").mkdir()
    (bottom / "low_dir" / "f").write_text("f\n")
    os.symlink(str(outside), upper / "low_dir")
    # special files
    os.mkfifo(bottom / "fifo", 0o644)
    os.mknod(bottom / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(bottom / "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 200))
    (bottom / "plain").write_text("plain\n")


def build_outside(outside: Path) -> None:
    outside.mkdir()
    (outside / "canary").write_text("canary\n")
    (outside / "canary_dir").mkdir()
    (outside / "canary_dir" / "secret").write_text("secret\n")


def operations(m: Path) -> list[tuple[str, Callable[[], object]]]:
    """Write-path operations that never follow a symlink themselves."""
    return [
        (
            "lchown abs_link (copy-up of a symlink)",
            lambda: os.chown(m / "abs_link", 1, 1, follow_symlinks=False),
        ),
        (
            "setxattr on rel_link",
            lambda: os.setxattr(m / "rel_link", "trusted.t", b"1", follow_symlinks=False),
        ),
        (
            "utime on dotdot_chain",
            lambda: os.utime(m / "dotdot_chain", ns=(1, 1), follow_symlinks=False),
        ),
        ("rename rel_link", lambda: os.rename(m / "rel_link", m / "moved_link")),
        (
            "link file_link",
            lambda: os.link(m / "file_link", m / "up_dir" / "hl", follow_symlinks=False),
        ),
        ("unlink sub/esc", lambda: os.unlink(m / "sub" / "esc")),
        ("create under up_dir", lambda: (m / "up_dir" / "new").write_text("new\n")),
        ("mkdir under up_dir", lambda: os.mkdir(m / "up_dir" / "nd")),
        ("rename a file into up_dir", lambda: os.rename(m / "plain", m / "up_dir" / "plain")),
        (
            "create under sub2 (copy-up of a dir above a symlink)",
            lambda: (m / "sub2" / "new").write_text("new\n"),
        ),
        ("unlink in sub2", lambda: os.unlink(m / "sub2" / "x")),
        ("rename sub/plain into sub2", lambda: os.rename(m / "sub" / "plain", m / "sub2" / "p")),
        ("rename up_dir (over a lower symlink)", lambda: os.rename(m / "up_dir", m / "up_dir2")),
        ("mkdir where up_dir was", lambda: os.mkdir(m / "up_dir")),
        ("create in it", lambda: (m / "up_dir" / "again").write_text("again\n")),
        ("unlink d (a symlink over a lower dir)", lambda: os.unlink(m / "d")),
        ("mkdir d", lambda: os.mkdir(m / "d")),
        ("list d", lambda: sorted(os.listdir(m / "d"))),
        ("unlink low_dir (upper symlink)", lambda: os.unlink(m / "low_dir")),
        ("list root", lambda: sorted(os.listdir(m))),
        ("chmod fifo (copy-up)", lambda: os.chmod(m / "fifo", 0o600)),
        ("chown null device (copy-up)", lambda: os.chown(m / "null", 5, 5)),
        ("chmod block device (copy-up)", lambda: os.chmod(m / "blk", 0o640)),
        ("rename the fifo", lambda: os.rename(m / "fifo", m / "sub2" / "fifo")),
        ("symlink out, created in merged", lambda: os.symlink("/" + "../" * 9, m / "made")),
        ("rename onto a symlink", lambda: os.rename(m / "sub2" / "new", m / "abs_link")),
    ]


def run_ops(m: Path) -> list[list]:
    results = []
    for name, fn in operations(m):
        try:
            results.append([name, "ok", fn()])
        except OSError as exc:
            results.append([name, "error", errno.errorcode.get(exc.errno or 0)])
    return results


def merged_view(m: Path) -> dict[str, tuple]:
    """The merged tree by lstat, never following a symlink."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(m):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                what: object = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                what = Path(p).read_bytes()
            else:
                what = st.st_rdev
            out[os.path.relpath(p, m)] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, what)
    return out


@pytest.mark.timeout(120)
def test_hostile_layers_through_the_write_path(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    build_outside(outside)
    build(tmp_path / "kernel", outside)
    build(tmp_path / "py", outside)
    before = fingerprint(outside, atime=True)
    k, p = tmp_path / "kernel", tmp_path / "py"
    with kernel_overlay([k / "lower0", k / "lower1"], k / "upper", k / "work", k / "merged"):
        kernel_results = run_ops(k / "merged")
        kernel_view = merged_view(k / "merged")
    # kernel overlayfs touches nothing outside either; from here on any event is ours
    watcher = Watcher(outside)
    try:
        args = [f"{p / 'lower0'}:{p / 'lower1'}", str(p / "upper"), str(p / "work")]
        with Daemon([*args, str(p / "merged")], p / "merged") as daemon:
            py_results = run_ops(p / "merged")
            py_view = merged_view(p / "merged")
            watcher.drain()
            touched_by_daemon = [pid for pid in watcher.pids if pid == daemon.pid]
            alive = daemon.alive()
        # after unmounting, a fresh mount must show the same tree
        with Daemon([*args, str(p / "merged")], p / "merged"):
            remount_view = merged_view(p / "merged")
        watcher.drain()
    finally:
        watcher.close()
    after = fingerprint(outside, atime=True)
    differ = [(a, b) for a, b in zip(kernel_results, py_results, strict=True) if a != b]
    lost = len(differ) + len(touched_by_daemon) + bool(diff_fingerprints(before, after))
    record("hostile", "write-path operations on hostile layers", len(py_results), lost)
    assert alive
    assert not touched_by_daemon, f"the daemon opened or read {len(touched_by_daemon)} times"
    assert diff_fingerprints(before, after) == []
    assert not differ, differ
    assert py_view == kernel_view
    assert remount_view == py_view
    # nothing outside ever shows as a name in the merged tree
    assert not any(n.endswith(("canary", "secret")) for n in py_view)


# -- mount-time refusals -------------------------------------------------------------------


@contextlib.contextmanager
def bind_mount(src: Path, dest: Path) -> Iterator[Path]:
    res = subprocess.run(["mount", "--bind", str(src), str(dest)], capture_output=True)
    assert res.returncode == 0, res.stderr
    try:
        yield dest
    finally:
        umount_exact(dest, fuse=False)


def _dirs(root: Path, *names: str) -> list[Path]:
    paths = [root / n for n in names]
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
    return paths


def overlap_cases(t: Path, stack: contextlib.ExitStack) -> dict[str, tuple[list[str], Path]]:
    """name -> (mount arguments, mount point): every one must be refused."""
    lo, up, wk, mp = _dirs(t, "lo", "up", "wk", "mp")
    cases: dict[str, tuple[list[str], Path]] = {}
    (lo_sub,) = _dirs(t, "lo/sub")
    cases["upper inside lower"] = ([str(lo), str(lo_sub), str(wk), str(mp)], mp)
    (up_in_wk,) = _dirs(t, "wk2/up")
    (wk2,) = _dirs(t, "wk2")
    cases["upper inside work"] = ([str(lo), str(up_in_wk), str(wk2), str(mp)], mp)
    cases["lower inside another lower"] = ([f"{lo}:{lo_sub}", str(up), str(wk), str(mp)], mp)
    cases["same lower twice"] = ([f"{lo}:{lo}", str(up), str(wk), str(mp)], mp)
    (inner_mp,) = _dirs(t, "lo/mnt")
    cases["mount point inside lower"] = ([str(lo), str(up), str(wk), str(inner_mp)], inner_mp)
    (up_mp,) = _dirs(t, "up/mnt")
    cases["mount point inside upper"] = ([str(lo), str(up), str(wk), str(up_mp)], up_mp)
    cases["mount point is the lower"] = ([str(lo), str(up), str(wk), str(lo)], lo)
    (mp_parent_lo,) = _dirs(t, "mp3/lower")
    (mp3,) = _dirs(t, "mp3")
    cases["lower inside mount point"] = ([str(mp_parent_lo), str(up), str(wk), str(mp3)], mp3)
    link = t / "link_to_lo"
    os.symlink(lo, link)
    cases["upper is a symlink to lower"] = ([str(lo), str(link), str(wk), str(mp)], mp)
    (bind,) = _dirs(t, "bind")
    stack.enter_context(bind_mount(lo_sub, bind))
    cases["upper is a bind mount of a lower subdir"] = ([str(lo), str(bind), str(wk), str(mp)], mp)
    (bind2,) = _dirs(t, "bind2")
    stack.enter_context(bind_mount(lo, bind2))
    (mp_in_bind,) = _dirs(t, "lo/mnt2")
    cases["mount point inside lower, reached by a bind mount"] = (
        [str(bind2), str(up), str(wk), str(mp_in_bind)],
        mp_in_bind,
    )
    return cases


@pytest.mark.timeout(180)
def test_overlapping_layers_refused(tmp_path: Path) -> None:
    failures = []
    with contextlib.ExitStack() as stack:
        cases = overlap_cases(tmp_path, stack)
        for name, (args, mp) in cases.items():
            code, err, mounted = run_mount_expecting_failure(args, mp)
            lines = err.strip().splitlines()
            good = (
                code not in (0, None)
                and not mounted
                and len(lines) == 1
                and "Traceback" not in err
                and not mounts_at(mp)
            )
            if not good:
                failures.append(f"{name}: exit {code}, mounted {mounted}, stderr {err!r}")
    record("hostile", "overlapping layers / mount point inside a layer", len(cases), len(failures))
    assert not failures, "\n".join(failures)


def test_cleanup_helpers_left_nothing(tmp_path: Path) -> None:
    """The bind mounts above are gone (a guard that the finalizers work)."""
    assert not mounts_at(tmp_path)
    shutil.rmtree(tmp_path, ignore_errors=True)
