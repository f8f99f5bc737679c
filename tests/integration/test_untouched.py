"""Untouched data: lower layers, and a containerd root that was only inspected, never change.

Two lowers full of everything a layer can hold (modes with setuid and sticky bits,
other owners, user and trusted xattrs, sparse and big files, symlinks, hard links, FIFOs,
devices, whiteouts, opaque directories, OCI ``.wh.`` files; old atimes and mtimes) are
fingerprinted (content hash, mode, owner, size, rdev, link target, every xattr, mtime and
atime), then put through everything a mount does: reads, mmap, xattr reads, copy-up of
every object, renames, unlinks, ``rm -r``, creates, a SIGKILL during a copy-up and a
remount, and a read-only mount. The fingerprints must be identical afterwards.

A private containerd root with an imported image gets the same treatment with every
``pyoverlay containerd`` command, including ``containerd mount`` and reads through it.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mounts import daemon_env, mounts_at, umount_exact
from reliability_util import Daemon, diff_fingerprints, fingerprint, record

OLD = 978_307_200_000_000_000  # 2001-01-01, in ns: any relatime update would show


def _file(path: Path, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
    path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def build_rich_lowers(top: Path, bottom: Path) -> None:
    for layer in (top, bottom):
        layer.mkdir(parents=True)
    _file(bottom / "plain", b"plain\n" * 100)
    _file(bottom / "secret", b"secret\n", 0o600, 1234, 5678)
    _file(bottom / "setuid", b"#!/bin/true\n", 0o4755)
    _file(bottom / "setgid", b"#!/bin/true\n", 0o2755, 0, 5678)
    _file(bottom / "big", os.urandom(6 << 20))
    with open(bottom / "sparse", "wb") as f:
        f.truncate(16 << 20)
        f.seek(8 << 20)
        f.write(b"middle")
    os.setxattr(bottom / "plain", "user.note", b"hello")
    os.setxattr(bottom / "plain", "trusted.note", b"root only")
    os.link(bottom / "plain", bottom / "plain-hardlink")
    os.symlink("plain", bottom / "rel-link")
    os.symlink("/nonexistent/target", bottom / "dangling-link")
    os.mkfifo(bottom / "fifo")
    os.mknod(bottom / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (bottom / "dir" / "deep" / "deeper").mkdir(parents=True)
    _file(bottom / "dir" / "deep" / "deeper" / "leaf", b"leaf\n", 0o640, 1234, 1234)
    _file(bottom / "dir" / "hidden-by-top", b"should be hidden\n")
    _file(bottom / "dir" / "oci-hidden", b"hidden by .wh.\n")
    os.setxattr(bottom / "dir", "user.dirnote", b"d")
    (bottom / "sticky").mkdir(mode=0o1777)
    os.chmod(bottom / "sticky", 0o1777)
    _file(bottom / "sticky" / "theirs", b"t\n", 0o666, 1234, 1234)
    (bottom / "opaque").mkdir()
    _file(bottom / "opaque" / "below", b"below\n")
    # the top layer: a whiteout, an OCI whiteout, an opaque dir, a merged dir
    (top / "dir").mkdir()
    os.mknod(top / "dir" / "hidden-by-top", stat.S_IFCHR, os.makedev(0, 0))
    _file(top / "dir" / ".wh.oci-hidden", b"")
    _file(top / "dir" / "from-top", b"top\n", 0o755, 1234, 5678)
    (top / "opaque").mkdir()
    os.setxattr(top / "opaque", "trusted.overlay.opaque", b"y")
    _file(top / "opaque" / "above", b"above\n")
    _file(top / "plain", b"top plain hides bottom\n")
    _set_old_times(top)
    _set_old_times(bottom)


def _set_old_times(root: Path) -> None:
    # deepest first, so setting a child's times does not touch its parent's again
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in [*filenames, *dirnames]:
            os.utime(os.path.join(dirpath, name), ns=(OLD, OLD), follow_symlinks=False)
    os.utime(root, ns=(OLD, OLD))


# -- the workload --------------------------------------------------------------------------


def _attempt(fn, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    """Run one operation; refusals (EXDEV, EPERM...) are fine, the layers are what counts."""
    with contextlib.suppress(OSError):
        fn(*args, **kwargs)


def read_everything(m: Path) -> int:
    count = 0
    for dirpath, dirnames, filenames in os.walk(m):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            count += 1
            with contextlib.suppress(OSError):
                for attr in os.listxattr(p, follow_symlinks=False):
                    _attempt(os.getxattr, p, attr, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    f.read()
                    if st.st_size:
                        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
                            mm[: min(4096, st.st_size)]
    return count


def change_everything(m: Path) -> None:
    """Copy up every object, then rename, remove and create all over the tree."""
    for dirpath, dirnames, filenames in os.walk(m):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            _attempt(os.chown, p, st.st_uid, st.st_gid, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                _attempt(os.setxattr, p, "user.touched", b"1")
                with contextlib.suppress(OSError), open(p, "ab") as f:
                    f.write(b"appended")
            elif stat.S_ISDIR(st.st_mode):
                _attempt(os.chmod, p, stat.S_IMODE(st.st_mode))
                (Path(p) / "created-here").write_text("new\n")
    _attempt(os.truncate, m / "sparse", 0)
    _attempt(os.rename, m / "plain", m / "renamed")
    _attempt(os.rename, m / "dir", m / "dir-renamed")  # EXDEV without redirect_dir
    _attempt(os.link, m / "setuid", m / "setuid-link")
    _attempt(os.unlink, m / "plain-hardlink")
    _attempt(os.unlink, m / "fifo")
    shutil.rmtree(m / "opaque", ignore_errors=True)
    shutil.rmtree(m / "dir", ignore_errors=True)
    (m / "dir").mkdir()
    (m / "dir" / "hidden-by-top").write_text("recreated\n")
    _attempt(os.removexattr, m / "renamed", "user.note")


def _kill_during_copy_up(args: list[str], merged: Path) -> None:
    """SIGKILL the daemon while it copies up the biggest file."""
    with Daemon(args, merged) as daemon:
        opener = threading.Thread(target=_attempt, args=(os.truncate, merged / "big", 1 << 20))
        opener.start()
        time.sleep(0.01)
        daemon.kill()
        opener.join(timeout=30)


def lower_workload(root: Path, lowers: list[Path]) -> int:
    upper, work, merged = root / "upper", root / "work", root / "merged"
    for d in (upper, work, merged):
        d.mkdir(parents=True)
    lower_arg = ":".join(str(p) for p in lowers)
    args = [lower_arg, str(upper), str(work), str(merged)]
    _kill_during_copy_up(args, merged)
    with Daemon(args, merged):
        seen = read_everything(merged)
        change_everything(merged)
        seen += read_everything(merged)
    with Daemon(args, merged):
        seen += read_everything(merged)
    with Daemon(["--read-only", lower_arg, str(merged)], merged):
        seen += read_everything(merged)
        code = None
        try:
            (merged / "x").write_text("x")
        except OSError as exc:
            code = exc.errno
        assert code == errno.EROFS
    return seen


@pytest.mark.timeout(180)
def test_lower_layers_untouched(tmp_path: Path) -> None:
    lowers = [tmp_path / "lower0", tmp_path / "lower1"]
    build_rich_lowers(*lowers)
    before = {str(p): fingerprint(p, atime=True) for p in lowers}
    seen = lower_workload(tmp_path / "run", lowers)
    after = {str(p): fingerprint(p, atime=True) for p in lowers}
    changes = [d for p in before for d in diff_fingerprints(before[p], after[p])]
    objects = sum(len(f) for f in before.values())
    record(
        "untouched",
        f"lower objects (content, mode, owner, xattrs, mtime, atime) over {seen} visits",
        objects,
        len(changes),
        "; ".join(changes)[:300],
    )
    assert not changes, "\n".join(changes)


# -- a containerd root that is only inspected ----------------------------------------------


@contextlib.contextmanager
def containerd_root(base: Path) -> Iterator[tuple[Path, str]]:
    """A private containerd root holding one imported image; containerd stopped after."""
    from containerd.ctrd_daemon import Containerd
    from containerd.ctrd_images import image_tar, multi_layers

    name = "docker.io/test/untouched:1"
    base.mkdir()
    daemon = Containerd(str(base))
    try:
        daemon.start()
        data, _ = image_tar(name, multi_layers())
        tar = base / "image.tar"
        tar.write_bytes(data)
        daemon.import_image(str(tar))
        daemon.stop()
        yield Path(daemon.root), name
    finally:
        daemon.cleanup()


def _pyoverlay(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyoverlay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=daemon_env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def inspect_root(root: Path, image: str, merged: Path) -> list[str]:
    """Every inspecting command; returns the commands that failed."""
    failed = []
    r = str(root)
    commands = [
        ["containerd", "images", "--root", r],
        ["containerd", "images", "--root", r, "--json"],
        ["containerd", "snapshots", "--root", r],
        ["containerd", "verify", "--root", r, "--all", "--no-progress"],
        ["containerd", "check", "--root", r, "--no-progress"],
        ["containerd", "mount", "--root", r, "--print-lowerdir", image, str(merged)],
    ]
    for cmd in commands:
        res = _pyoverlay(*cmd)
        if res.returncode != 0:
            failed.append(f"{' '.join(cmd[:2])}: {res.stderr.strip()}")
    res = _pyoverlay("containerd", "mount", "--root", r, image, str(merged))
    if res.returncode != 0:
        return [*failed, f"containerd mount: {res.stderr.strip()}"]
    try:
        read_everything(merged)
        for attempt in (lambda: (merged / "x").write_text("x"), lambda: os.rmdir(merged / "etc")):
            _attempt(attempt)
    finally:
        umount_exact(merged, fuse=True)
    return failed


@pytest.mark.timeout(240)
def test_inspected_containerd_root_untouched(tmp_path: Path) -> None:
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        pytest.fail("containerd and ctr are part of the test set-up (scripts/bootstrap.sh)")
    merged = tmp_path / "merged"
    merged.mkdir()
    with containerd_root(tmp_path / "ctrd") as (root, image):
        before = fingerprint(root)
        failed = inspect_root(root, image, merged)
        after = fingerprint(root)
    assert not mounts_at(merged)
    changes = diff_fingerprints(before, after)
    record(
        "untouched",
        "inspected containerd root (content, mode, owner, xattrs, mtime)",
        len(before),
        len(changes),
        "; ".join(changes)[:300],
    )
    assert not failed, failed
    assert not changes, "\n".join(changes)
