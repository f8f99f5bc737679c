"""Permissions: a non-root user gets exactly the answers kernel overlayfs gives.

One layer set (files of another user with mode 0600, a directory the user cannot write,
a sticky /tmp-like directory, a setgid directory, files the user owns) is copied twice and
mounted once with kernel overlayfs and once with pyoverlay (as root, so with allow_other).
A child forked for each mount drops to uid 1000 (groups 1000 and 3000, no system user
needed: setgroups, setresgid, setresuid) and runs the same list of real operations; the
answers (errno or result) and the owners and modes of what it created, in the merged
view and in upper, must match the kernel's.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mounts import kernel_overlay
from reliability_util import Daemon, record

USER, GROUP, SHARED_GROUP = 1000, 1000, 3000
OTHER, OTHER_GROUP, FOREIGN_GROUP = 2000, 2000, 4000


def _make(path: Path, mode: int, uid: int, gid: int, data: bytes | None = None) -> None:
    if data is None:
        path.mkdir()
    else:
        path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def build_layers(root: Path) -> None:
    lower, upper = root / "lower", root / "upper"
    for d in (lower, upper, root / "work", root / "merged"):
        d.mkdir(mode=0o755)
        d.chmod(0o755)
    _make(lower / "home", 0o755, USER, GROUP)
    _make(lower / "secret", 0o600, OTHER, OTHER_GROUP, b"secret\n")
    _make(lower / "pub", 0o644, OTHER, OTHER_GROUP, b"public\n")
    _make(lower / "grp", 0o640, OTHER, SHARED_GROUP, b"group\n")
    _make(lower / "mine", 0o644, USER, GROUP, b"mine\n")
    _make(lower / "suid", 0o4755, USER, GROUP, b"#!/bin/true\n")
    _make(lower / "suid_other", 0o6777, OTHER, OTHER_GROUP, b"#!/bin/true\n")
    _make(lower / "foreign_group", 0o644, USER, FOREIGN_GROUP, b"fg\n")
    _make(lower / "ro_dir", 0o755, OTHER, OTHER_GROUP)
    _make(lower / "ro_dir" / "inner", 0o666, OTHER, OTHER_GROUP, b"inner\n")
    _make(lower / "tmp", 0o1777, 0, 0)
    _make(lower / "tmp" / "theirs", 0o666, OTHER, OTHER_GROUP, b"theirs\n")
    _make(lower / "tmp" / "ours", 0o644, USER, GROUP, b"ours\n")
    _make(lower / "sgid", 0o2775, OTHER, SHARED_GROUP)
    _make(lower / "sgid" / "old", 0o664, OTHER, SHARED_GROUP, b"old\n")
    _make(lower / "noexec", 0o644, OTHER, OTHER_GROUP)
    _make(upper / "noexec", 0o644, OTHER, OTHER_GROUP)
    _make(lower / "noexec" / "hidden", 0o644, OTHER, OTHER_GROUP, b"hidden\n")
    _make(upper / "upper_secret", 0o600, OTHER, OTHER_GROUP, b"upper secret\n")
    _make(upper / "home", 0o755, USER, GROUP)  # a merged directory the user owns


def _read(p: Path) -> str:
    return p.read_bytes().decode()


def _write(p: Path, flags: int = os.O_WRONLY) -> int:
    fd = os.open(p, flags, 0o666)
    try:
        return os.write(fd, b"x")
    finally:
        os.close(fd)


def _create(p: Path) -> int:
    return _write(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL)


def _owner(p: Path) -> list[int]:
    st = os.lstat(p)
    return [st.st_uid, st.st_gid, st.st_mode]


def operations(m: Path) -> list[tuple[str, Callable[[], object]]]:
    """What the user tries, in order (later ones see the effects of earlier ones)."""
    return [
        ("read another user's 0600 file", lambda: _read(m / "secret")),
        ("read another user's 0600 file in upper", lambda: _read(m / "upper_secret")),
        ("open it O_TRUNC", lambda: _write(m / "secret", os.O_WRONLY | os.O_TRUNC)),
        ("access(R_OK) on it", lambda: os.access(m / "secret", os.R_OK)),
        ("read a 0644 file", lambda: _read(m / "pub")),
        ("write a 0644 file of another user", lambda: _write(m / "pub")),
        ("truncate it", lambda: os.truncate(m / "pub", 0)),
        ("chmod it", lambda: os.chmod(m / "pub", 0o666)),
        ("chown it to self", lambda: os.chown(m / "pub", USER, GROUP)),
        ("utime(now) on it", lambda: os.utime(m / "pub")),
        ("utime(explicit) on it", lambda: os.utime(m / "pub", (1, 1))),
        ("setxattr on it", lambda: os.setxattr(m / "pub", "user.x", b"1")),
        ("hard link to it", lambda: os.link(m / "pub", m / "home" / "pub-link")),
        ("read a 0640 file of a group it is in", lambda: _read(m / "grp")),
        ("write that file", lambda: _write(m / "grp")),
        ("create in a dir it cannot write", lambda: _create(m / "ro_dir" / "new")),
        ("mkdir in a dir it cannot write", lambda: os.mkdir(m / "ro_dir" / "newdir")),
        ("unlink in a dir it cannot write", lambda: os.unlink(m / "ro_dir" / "inner")),
        ("write a 0666 file in that dir", lambda: _write(m / "ro_dir" / "inner")),
        ("rename out of it", lambda: os.rename(m / "ro_dir" / "inner", m / "home" / "x")),
        ("rmdir a dir in root", lambda: os.rmdir(m / "ro_dir")),
        ("stat in a dir without x", lambda: os.stat(m / "noexec" / "hidden").st_size),
        ("list a dir without x", lambda: sorted(os.listdir(m / "noexec"))),
        ("create in own dir", lambda: _create(m / "home" / "new")),
        ("owner of the new file", lambda: _owner(m / "home" / "new")),
        ("mkdir in own dir", lambda: os.mkdir(m / "home" / "newdir", 0o750)),
        ("owner of the new dir", lambda: _owner(m / "home" / "newdir")),
        ("symlink in own dir", lambda: os.symlink("target", m / "home" / "sym")),
        ("owner of the symlink", lambda: _owner(m / "home" / "sym")[:2]),
        ("mkfifo in own dir", lambda: os.mkfifo(m / "home" / "fifo", 0o640)),
        ("owner of the fifo", lambda: _owner(m / "home" / "fifo")),
        ("sticky: unlink another's file", lambda: os.unlink(m / "tmp" / "theirs")),
        ("sticky: rename another's file", lambda: os.rename(m / "tmp" / "theirs", m / "tmp" / "z")),
        ("sticky: write another's 0666 file", lambda: _write(m / "tmp" / "theirs")),
        ("sticky: unlink own file", lambda: os.unlink(m / "tmp" / "ours")),
        ("sticky: create", lambda: _create(m / "tmp" / "made")),
        ("sticky: owner of created", lambda: _owner(m / "tmp" / "made")),
        ("setgid dir: create", lambda: _create(m / "sgid" / "f")),
        ("setgid dir: owner of file", lambda: _owner(m / "sgid" / "f")),
        ("setgid dir: mkdir", lambda: os.mkdir(m / "sgid" / "d", 0o755)),
        ("setgid dir: owner and mode of dir", lambda: _owner(m / "sgid" / "d")),
        ("setgid dir: write group-writable file", lambda: _write(m / "sgid" / "old")),
        ("chown own file to another user", lambda: os.chown(m / "mine", OTHER, -1)),
        ("chgrp own file to a group it is in", lambda: os.chown(m / "mine", -1, SHARED_GROUP)),
        ("chgrp own file to a foreign group", lambda: os.chown(m / "mine", -1, FOREIGN_GROUP)),
        ("chmod own file", lambda: os.chmod(m / "mine", 0o600)),
        ("chmod g+s on own file, group it is in", lambda: os.chmod(m / "mine", 0o2644)),
        ("mode after that", lambda: _owner(m / "mine")),
        ("setxattr user.* on own file", lambda: os.setxattr(m / "mine", "user.x", b"1")),
        ("setxattr trusted.* on own file", lambda: os.setxattr(m / "mine", "trusted.x", b"1")),
        ("write own setuid file", lambda: _write(m / "suid")),
        ("mode of setuid file after write", lambda: _owner(m / "suid")),
        ("write another's setuid 0777 file", lambda: _write(m / "suid_other")),
        ("its mode after the write", lambda: _owner(m / "suid_other")),
        ("chmod g+s, group it is not in", lambda: os.chmod(m / "foreign_group", 0o2755)),
        ("mode after that (setgid dropped)", lambda: _owner(m / "foreign_group")),
        (
            "rename own file into the sticky dir",
            lambda: os.rename(m / "home" / "new", m / "tmp" / "n"),
        ),
        ("owner after rename", lambda: _owner(m / "tmp" / "n")),
    ]


def run_as_user(merged: Path) -> list[list]:
    """Fork, drop to the test user, run the operations; return [name, outcome] pairs."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.close(read_fd)
            os.setgroups([GROUP, SHARED_GROUP])
            os.setresgid(GROUP, GROUP, GROUP)
            os.setresuid(USER, USER, USER)
            os.umask(0o022)
            results = []
            for name, fn in operations(merged):
                try:
                    results.append([name, "ok", fn()])
                except OSError as exc:
                    results.append([name, "error", errno.errorcode.get(exc.errno or 0)])
            os.write(write_fd, json.dumps(results).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged child failed"
    return json.loads(data)


NEW_OBJECTS = ("home/newdir", "home/sym", "home/fifo", "tmp/made", "tmp/n", "sgid/f", "sgid/d")


def upper_owners(upper: Path) -> dict[str, list[int] | None]:
    out: dict[str, list[int] | None] = {}
    for rel in NEW_OBJECTS:
        p = upper / rel
        out[rel] = _owner(p) if os.path.lexists(p) else None
        if out[rel] is not None and stat.S_ISLNK(out[rel][2]):  # type: ignore[index]
            out[rel] = out[rel][:2]  # type: ignore[index]
    return out


@pytest.fixture
def perm_root() -> Iterator[Path]:
    # Not under pytest's tmp_path: its parents are 0700, and the user must reach the mount.
    root = Path(tempfile.mkdtemp(prefix="pyoverlay-perm-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(120)
def test_unprivileged_user_matches_kernel(perm_root: Path) -> None:
    src = perm_root / "src"
    src.mkdir(mode=0o755)
    build_layers(src)
    sides = {}
    for side in ("kernel", "pyoverlay"):
        root = perm_root / side
        shutil.copytree(src, root, symlinks=True, copy_function=shutil.copy2)
        _copy_owners(src, root)
        sides[side] = root
    k, p = sides["kernel"], sides["pyoverlay"]
    with kernel_overlay([k / "lower"], k / "upper", k / "work", k / "merged"):
        kernel_results = run_as_user(k / "merged")
    args = [str(p / "lower"), str(p / "upper"), str(p / "work"), str(p / "merged")]
    with Daemon(args, p / "merged"):
        py_results = run_as_user(p / "merged")
    differ = [(a, b) for a, b in zip(kernel_results, py_results, strict=True) if a != b]
    owners_k, owners_p = upper_owners(k / "upper"), upper_owners(p / "upper")
    record(
        "permissions",
        "unprivileged operations compared with kernel overlayfs",
        len(kernel_results),
        len(differ),
        "; ".join(f"{a[0]}: kernel {a[1:]}, pyoverlay {b[1:]}" for a, b in differ),
    )
    assert not differ, "\n".join(f"{a[0]}: kernel {a[1:]} pyoverlay {b[1:]}" for a, b in differ)
    assert owners_p == owners_k
    # and in any case: what the user made belongs to the user in upper
    for rel, owner in owners_p.items():
        assert owner is not None and owner[0] == USER, (rel, owner)
    # the answers must include real refusals, or the user was not unprivileged
    refusals = sum(1 for r in py_results if r[1] == "error")
    assert refusals >= 15, py_results


def _copy_owners(src: Path, dest: Path) -> None:
    """copytree keeps modes and times but not owners; set those too."""
    for dirpath, dirnames, filenames in os.walk(src):
        for name in [".", *dirnames, *filenames]:
            s = Path(dirpath) / name
            d = dest / s.relative_to(src)
            st = os.lstat(s)
            os.chown(d, st.st_uid, st.st_gid, follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(d, stat.S_IMODE(st.st_mode))
