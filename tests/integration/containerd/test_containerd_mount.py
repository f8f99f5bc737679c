"""``pyoverlay containerd mount`` against what containerd and the kernel show.

A container started by the real containerd runs on a kernel overlay; its rootfs, seen
through /proc/PID/root, must equal our read-only mount of the same container, and our
chain must equal the lowerdir/upperdir of that kernel mount.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .ctrd_env import MULTI, REPO_ROOT, CtrdEnv, fingerprint, run_cli

pytestmark = [pytest.mark.containerd]


def _mount_types(path: Path) -> list[str]:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        rows = [line.split() for line in f]
    return [r[r.index("-") + 1] for r in rows if r[4] == target]


@contextlib.contextmanager
def containerd_mount(root: str, name: str, merged: Path) -> Iterator[Path]:
    """Run ``pyoverlay containerd mount -f`` as our child; unmount and end it afterwards."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "pyoverlay", "containerd", "mount", "-f", "--root", root]
    proc = subprocess.Popen(
        [*cmd, name, str(merged)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not any(t.startswith("fuse") for t in _mount_types(merged)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mount failed: {proc.communicate(timeout=10)[1]!r}")
            time.sleep(0.05)
        yield merged
    finally:
        if any(t.startswith("fuse") for t in _mount_types(merged)):
            subprocess.run(["fusermount3", "-u", "--", str(merged)], check=False)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def kernel_ro_overlay(lowerdirs: list[str], merged: Path) -> Iterator[Path]:
    opts = "lowerdir=" + ":".join(lowerdirs)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], check=True)
    try:
        yield merged
    finally:
        subprocess.run(["umount", "--", str(merged)], check=False)


def _hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tree(top: Path, opaque: frozenset[str] = frozenset()) -> dict[str, tuple]:
    """Names, types, modes, owners, sizes, content hashes, link targets and devices.

    Paths in ``opaque`` (mount points inside a container) contribute only their type.
    """
    result: dict[str, tuple] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        for entry in os.scandir(os.path.join(top, rel) if rel else top):
            path = f"{rel}/{entry.name}" if rel else entry.name
            st = entry.stat(follow_symlinks=False)
            kind = stat.S_IFMT(st.st_mode)
            if path in opaque:
                result[path] = (kind,)
                continue
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                extra = (st.st_size, _hash(entry.path))
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(entry.path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = st.st_rdev
            elif stat.S_ISDIR(st.st_mode):
                stack.append(path)
            result[path] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, extra)
    return result


def _rootfs_mount(pid: int) -> tuple[list[str], set[str]]:
    """The container's rootfs overlay (upperdir first, then lowerdirs) and its mount points."""
    layers: list[str] = []
    points = set()
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == "/":
                sep = fields.index("-")
                options = dict(
                    o.partition("=")[::2] for o in fields[sep + 3].split(",") if "=" in o
                )
                layers = [options["upperdir"], *options["lowerdir"].split(":")]
            elif fields[4].count("/") == 1:
                points.add(fields[4].lstrip("/"))
    return layers, points


@pytest.mark.timeout(180)
def test_container_mount_equals_its_rootfs(ctrd: CtrdEnv, tmp_path: Path) -> None:
    pid = ctrd.daemon.run(MULTI, "cmp1", "/bin/busybox", "sleep", "600")
    try:
        # runc has finished creating mount points once the process runs: write a marker
        # through the container's rootfs so the rw layer holds a file of its own.
        ctrd.daemon.ctr(
            "task",
            "exec",
            "--exec-id",
            "w1",
            "cmp1",
            "/bin/busybox",
            "sh",
            "-c",
            "echo from-container > /written && /bin/busybox rm /del/keep",
        )
        layers, points = _rootfs_mount(pid)
        res = run_cli(
            "containerd",
            "mount",
            "--print-lowerdir",
            "cmp1",
            "x",
            "--root",
            ctrd.daemon.root,
            "--json",
        )
        assert res.code == 0, res.err
        assert res.json()["kind"] == "container"
        assert res.json()["lowerdirs"] == layers
        container_view = tree(Path(f"/proc/{pid}/root"), frozenset(points))
        assert container_view["written"][4][0] == len("from-container\n")
        assert "del/keep" not in container_view and "del/gone" not in container_view
        merged = tmp_path / "merged"
        merged.mkdir()
        with containerd_mount(ctrd.daemon.root, "cmp1", merged):
            assert tree(merged, frozenset(points)) == container_view
            # The container keeps writing; the mount shows it without remounting.
            ctrd.daemon.ctr(
                "task",
                "exec",
                "--exec-id",
                "w2",
                "cmp1",
                "/bin/busybox",
                "sh",
                "-c",
                "echo later > /later",
            )
            assert (merged / "later").read_text() == "later\n"
            with pytest.raises(OSError) as info:
                (merged / "new").write_text("x")
            assert info.value.errno == errno.EROFS
    finally:
        ctrd.daemon.kill_task("default/cmp1")
        ctrd.daemon.tasks.remove("default/cmp1")


@pytest.mark.timeout(120)
def test_image_mount_equals_kernel_overlay(ctrd: CtrdEnv, tmp_path: Path) -> None:
    root = ctrd.copy(tmp_path / "root")
    lowerdirs = [str(root / d) for d in reversed(ctrd.layer_dirs[("default", MULTI)])]
    (tmp_path / "kernel").mkdir()
    (tmp_path / "ours").mkdir()
    with kernel_ro_overlay(lowerdirs, tmp_path / "kernel") as kernel:
        expected = tree(kernel)
    assert "opq/new" in expected and "opq/old1" not in expected and "del/gone" not in expected
    with containerd_mount(str(root), "test/multi:1", tmp_path / "ours") as ours:
        assert tree(ours) == expected
        with pytest.raises(OSError) as info:
            os.chmod(ours / "etc/passwd", 0o600)
        assert info.value.errno == errno.EROFS


@pytest.mark.timeout(120)
def test_image_mount_leaves_root_untouched(ctrd: CtrdEnv, tmp_path: Path) -> None:
    root = ctrd.copy_with_stale_atimes(tmp_path / "root")
    before = fingerprint(root)
    (tmp_path / "ours").mkdir()
    with containerd_mount(str(root), "test/multi:1", tmp_path / "ours") as ours:
        tree(ours)  # reads every file and lists every directory
    # Nothing under the root changed, atimes included.
    assert fingerprint(root) == before


def test_mount_unknown_name_is_one_line_error(ctrd: CtrdEnv, tmp_path: Path) -> None:
    res = run_cli("containerd", "mount", "nosuch", str(tmp_path), "--root", ctrd.daemon.root)
    assert res.code == 1
    assert res.err.count("\n") == 1 and "nosuch: no image, container or snapshot" in res.err
