"""pyoverlay's merged read view against kernel overlayfs on identical layer sets.

Each layer set (layersets.py) is built once, copied for each side, and mounted by the
kernel (pinned options) and by ``pyoverlay mount -f``. The kernel-only tests check the
harness itself (the set shows what it was built to show); the others require pyoverlay
to match the kernel exactly.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import json
import mmap
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from layersets import BY_NAME, LAYER_SETS, LayerSet
from mounts import (
    Side,
    daemon_env,
    end_process,
    is_mounted,
    kernel_overlay,
    pyoverlay_command,
    pyoverlay_mount,
    umount_exact,
    wait_for_fuse_mount,
)
from treeview import (
    KINDS,
    Dirent,
    TreeView,
    abspath,
    diff_views,
    open_dir,
    read_batch,
    read_entries,
    snapshot,
    tree_paths,
)

pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module", params=[s.name for s in LAYER_SETS])
def layer_set(request: pytest.FixtureRequest) -> LayerSet:
    return BY_NAME[request.param]


# -- the harness itself: the kernel shows what each set was built to show ------------


def _expectation_failures(ls: LayerSet, side: Side, view: TreeView) -> list[str]:
    out = []
    for path in ls.present:
        if path not in view.nodes:
            out.append(f"{path!r} should be visible")
    for path in ls.absent:
        if path in view.nodes:
            out.append(f"{path!r} should be hidden")
    for path, data in ls.contents:
        with open(abspath(side.merged, path), "rb") as f:
            got = f.read()
        if got != data:
            out.append(f"{path!r} reads {got!r}, expected {data!r}")
    out += [f"{p!r} is an overlay marker and must not show" for p in view.nodes if _marker(p)]
    return out


def _marker(path: bytes) -> bool:
    return os.path.basename(path).startswith(b".wh.")


def test_kernel_shows_the_layer_set(
    layer_set: LayerSet, kernel_side: Side, kernel_view: TreeView
) -> None:
    assert _expectation_failures(layer_set, kernel_side, kernel_view) == []
    assert kernel_view.problems == []


def test_kernel_readdir_in_small_chunks(kernel_side: Side, kernel_view: TreeView) -> None:
    _check_chunked_readdir(kernel_side, kernel_view)


# -- pyoverlay against the kernel -----------------------------------------------------


def test_pyoverlay_shows_the_layer_set(
    layer_set: LayerSet, pyoverlay_side: Side, pyoverlay_view: TreeView
) -> None:
    assert _expectation_failures(layer_set, pyoverlay_side, pyoverlay_view) == []


def test_merged_view_identical(
    layer_set: LayerSet, kernel_view: TreeView, pyoverlay_view: TreeView
) -> None:
    diff = _compare(layer_set, kernel_view, pyoverlay_view)
    assert diff == [], "\n".join(diff)


def _compare(layer_set: LayerSet, kernel_view: TreeView, view: TreeView) -> list[str]:
    # Directory sizes depend on the marker files the two variants hold; skip them there.
    # A one-lower read-only set gets an empty second lower on the kernel side (the kernel
    # wants two), which makes the kernel's root a merged dir with nlink 1; skip that too.
    padded = layer_set.lowers == 1 and not layer_set.upper
    return diff_views(
        kernel_view, view, ignore_dir_size=layer_set.variants, ignore_root_nlink=padded
    )


def test_inode_numbers_consistent(pyoverlay_view: TreeView) -> None:
    """st_ino equals d_ino, hard links share one, nothing else does."""
    assert pyoverlay_view.problems == []


def test_inode_numbers_stable(pyoverlay_side: Side, pyoverlay_view: TreeView) -> None:
    """Looking names up again, after the whole tree was walked, gives the same st_ino."""
    changed = []
    for rel in _sample(tree_paths(pyoverlay_view), 1000):
        now = os.lstat(abspath(pyoverlay_side.merged, rel)).st_ino
        if now != pyoverlay_view.inos[rel]:
            changed.append(f"{rel!r}: st_ino {pyoverlay_view.inos[rel]} -> {now}")
    assert changed[:30] == []


def test_pyoverlay_readdir_in_small_chunks(pyoverlay_side: Side, pyoverlay_view: TreeView) -> None:
    _check_chunked_readdir(pyoverlay_side, pyoverlay_view)


def test_hidden_names_not_found(
    layer_set: LayerSet, kernel_side: Side, pyoverlay_side: Side, kernel_view: TreeView
) -> None:
    """Hidden names, and marker files a layer holds, give ENOENT on lookup too."""
    names = [*layer_set.absent, *_marker_names(pyoverlay_side)]
    results = {
        side_name: [_errno_of(os.lstat, abspath(side.merged, n)) for n in names]
        for side_name, side in (("kernel", kernel_side), ("pyoverlay", pyoverlay_side))
    }
    # Below a name that became a non-directory the answer is ENOTDIR, as usual.
    assert set(results["kernel"]) <= {"ENOENT", "ENOTDIR"}, results["kernel"]
    wrong = [
        f"{n!r}: kernel {k} pyoverlay {p}"
        for n, k, p in zip(names, results["kernel"], results["pyoverlay"], strict=True)
        if k != p
    ]
    assert wrong == []


def _marker_names(side: Side) -> list[bytes]:
    """Relative paths of ``.wh.*`` files in any layer of ``side`` (the pyoverlay variant)."""
    found = set()
    for layer in [*side.lowers, *([side.upper] if side.upper else [])]:
        base = os.fsencode(layer)
        for dirpath, dirnames, filenames in os.walk(base):
            for name in [*filenames, *dirnames]:
                if name.startswith(b".wh."):
                    found.add(os.path.relpath(os.path.join(dirpath, name), base))
    return sorted(found)


def _errno_of(func: Callable[..., object], *args: object, **kwargs: object) -> str:
    try:
        func(*args, **kwargs)
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


def test_private_xattrs_hidden(
    layer_set: LayerSet,
    kernel_side: Side,
    pyoverlay_side: Side,
    kernel_view: TreeView,
    pyoverlay_view: TreeView,
) -> None:
    """listxattr never shows the overlay's own xattrs and getxattr of them fails alike."""
    private = (layer_set.prefix, "user.fuseoverlayfs.")
    listed = [
        f"{p!r}: {name}"
        for p, n in pyoverlay_view.nodes.items()
        for name, _ in n.xattrs
        if name.startswith(private)
        and p in kernel_view.nodes
        and name not in dict(kernel_view.nodes[p].xattrs)
    ]
    assert listed == []
    probes = [layer_set.prefix + s for s in ("opaque", "whiteout", "origin", "impure", "uuid")]
    probes.append("user.fuseoverlayfs.opaque")
    dirs = _sample(tree_paths(kernel_view, "dir"), 300)
    got = {}
    for side_name, side in (("kernel", kernel_side), ("pyoverlay", pyoverlay_side)):
        got[side_name] = [
            (d, x, _errno_of(os.getxattr, abspath(side.merged, d), x)) for d in dirs for x in probes
        ]
    diff = [f"{k} vs {p}" for k, p in zip(got["kernel"], got["pyoverlay"], strict=True) if k != p]
    assert diff == []


def test_errors_match_kernel(
    kernel_side: Side, pyoverlay_side: Side, kernel_view: TreeView
) -> None:
    """readlink, opendir and lookups below non-directories fail with the kernel's errno."""
    paths = _sample(tree_paths(kernel_view), 400)
    got = {}
    for side_name, side in (("kernel", kernel_side), ("pyoverlay", pyoverlay_side)):
        got[side_name] = [_probe_errors(side, rel, kernel_view.nodes[rel].kind) for rel in paths]
    diff = [
        f"{rel!r}: kernel {k} pyoverlay {p}"
        for rel, k, p in zip(paths, got["kernel"], got["pyoverlay"], strict=True)
        if k != p
    ]
    assert diff == []


def _probe_errors(side: Side, rel: bytes, kind: str) -> tuple[str, ...]:
    path = abspath(side.merged, rel)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    results = [
        _errno_of(os.readlink, path),
        _errno_of(os.listdir, path),
        _errno_of(os.lstat, os.path.join(path, b"no-such-child")),
    ]
    if kind not in ("chr", "blk"):  # device opens depend on mount flags, tested apart
        results.append(_errno_of(lambda: os.close(os.open(path, flags))))
    return tuple(results)


def test_statfs(kernel_side: Side, pyoverlay_side: Side) -> None:
    k, p = os.statvfs(kernel_side.merged), os.statvfs(pyoverlay_side.merged)
    fields = ("f_bsize", "f_frsize", "f_blocks", "f_files", "f_namemax")
    assert {f: getattr(p, f) for f in fields} == {f: getattr(k, f) for f in fields}
    assert p.f_bavail <= p.f_bfree <= p.f_blocks
    # Free space moves while other work runs; it must still be the same filesystem's.
    assert abs(p.f_bfree - k.f_bfree) <= max(k.f_blocks // 100, 1024)
    assert p.f_flag & os.ST_RDONLY == k.f_flag & os.ST_RDONLY


def test_mount_flags_match_kernel(kernel_side: Side, pyoverlay_side: Side) -> None:
    """setuid binaries and device nodes in the merged tree work as on a kernel mount."""
    k, p = os.statvfs(kernel_side.merged), os.statvfs(pyoverlay_side.merged)
    for flag in ("ST_NOSUID", "ST_NODEV", "ST_NOEXEC"):
        bit = getattr(os, flag)
        assert (p.f_flag & bit) == (k.f_flag & bit), flag


USERS = ((0, 0), (1000, 1000), (2000, 2000))


@pytest.mark.parametrize("uid,gid", USERS, ids=[f"uid{u}" for u, _ in USERS])
def test_permissions_as_user(
    uid: int, gid: int, kernel_side: Side, pyoverlay_side: Side, kernel_view: TreeView
) -> None:
    """access(2), open, listxattr and getxattr answer as on the kernel mount, per user."""
    paths = _sample(tree_paths(kernel_view), 1500)
    k = _as_user(kernel_side, paths, uid, gid)
    p = _as_user(pyoverlay_side, paths, uid, gid)
    diff = [
        f"{rel!r}: kernel {a} pyoverlay {b}"
        for rel, a, b in zip(paths, k, p, strict=True)
        if a != b
    ]
    assert diff[:40] == []


def _user_answers(rel: bytes) -> str:
    """What one user gets for ``rel``: FRWX from access(2), then open/xattr results."""
    modes = (os.F_OK, os.R_OK, os.W_OK, os.X_OK)
    access = "".join(
        "FRWX"[i] if os.access(rel, m, follow_symlinks=False) else "-" for i, m in enumerate(modes)
    )
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    opened = _errno_of(lambda: os.close(os.open(rel, flags)))
    try:
        names = ",".join(sorted(os.listxattr(rel, follow_symlinks=False)))
    except OSError as exc:
        names = errno.errorcode.get(exc.errno or 0, "?")
    comment = _errno_of(os.getxattr, rel, "user.comment", follow_symlinks=False)
    return f"{access} open={opened} list=[{names}] get={comment}"


def _as_user(side: Side, paths: list[bytes], uid: int, gid: int) -> list[str]:
    """_user_answers for each path, computed in a child running as uid:gid.

    The child enters the mount as root and then drops privileges, so the tmp dirs
    above the mount (mode 0700) do not get in the way.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(read_fd)
            os.chdir(side.merged)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            out = json.dumps([_user_answers(rel) for rel in paths]).encode()
            view = memoryview(out)
            while view:
                view = view[os.write(write_fd, view) :]
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 1 << 16):
        data += chunk
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child running as the user failed"
    return json.loads(data)


RO_SETS = [s.name for s in LAYER_SETS if not s.upper or s.ro_flag]


@pytest.mark.parametrize("layer_set", RO_SETS, indirect=True)
def test_read_only_mount_refuses_writes(
    layer_set: LayerSet, kernel_side: Side, pyoverlay_side: Side, kernel_view: TreeView
) -> None:
    """Without an upper layer every change fails as on the kernel mount (EROFS)."""
    some_file = next(p for p in tree_paths(kernel_view, "file") if p != b".")
    some_dir = next(p for p in tree_paths(kernel_view, "dir") if p != b".")
    got = {}
    for name, side in (("kernel", kernel_side), ("pyoverlay", pyoverlay_side)):
        f, d = abspath(side.merged, some_file), abspath(side.merged, some_dir)
        got[name] = {
            "create": _errno_of(os.open, os.path.join(d, b"new"), os.O_CREAT | os.O_WRONLY),
            "open-write": _errno_of(os.open, f, os.O_WRONLY),
            "mkdir": _errno_of(os.mkdir, os.path.join(d, b"newdir")),
            "unlink": _errno_of(os.unlink, f),
            "rmdir": _errno_of(os.rmdir, d),
            "chmod": _errno_of(os.chmod, f, 0o600),
            "setxattr": _errno_of(os.setxattr, f, "user.new", b"v"),
            "rename": _errno_of(os.rename, f, os.path.join(d, b"moved")),
        }
    assert set(got["kernel"].values()) <= {"EROFS", "ENOTEMPTY"}, got["kernel"]
    assert got["pyoverlay"] == got["kernel"]


def test_mmap_and_pread_match(
    kernel_side: Side, pyoverlay_side: Side, kernel_view: TreeView
) -> None:
    """Files read through mmap and pread at odd offsets give the kernel's bytes."""
    files = [p for p in tree_paths(kernel_view, "file") if kernel_view.nodes[p].size > 0]
    files = sorted(files, key=lambda p: -kernel_view.nodes[p].size)[:8]
    assert files, "every layer set holds some non-empty file"
    for rel in files:
        k, p = _mapped_and_pread(kernel_side, rel), _mapped_and_pread(pyoverlay_side, rel)
        assert p == k, f"{rel!r}: mmap/pread content differs"


def _mapped_and_pread(side: Side, rel: bytes) -> tuple[str, list[bytes]]:
    fd = os.open(abspath(side.merged, rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
            digest = hashlib.sha256(m).hexdigest()
        offsets = sorted({0, 1, size // 3, size // 2 + 7, max(size - 5, 0), size, size + 100})
        return digest, [os.pread(fd, 4099, off) for off in offsets]
    finally:
        os.close(fd)


#: Sets small enough to walk four times at once in a second or two.
SMALL_SETS = [s.name for s in LAYER_SETS if s.name != "bigdir"]


@pytest.mark.parametrize("layer_set", SMALL_SETS, indirect=True)
def test_concurrent_walks_agree(
    layer_set: LayerSet, kernel_view: TreeView, pyoverlay_side: Side
) -> None:
    """Several threads walking and reading at once all see the kernel's view."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        views = list(pool.map(lambda _: snapshot(pyoverlay_side.merged), range(4)))
    for view in views:
        diff = _compare(layer_set, kernel_view, view)
        assert diff == [], "\n".join(diff)
        assert view.problems == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", ["kernel", "pyoverlay"])
def test_inode_numbers_persist_across_remount(which: str, tmp_path: Path) -> None:
    """Like the kernel with all layers on one filesystem, st_ino survives a remount."""
    ls = BY_NAME["rw_6"]
    src = ls.make(tmp_path / "src", "kernel")
    work = src / "work"
    work.mkdir()
    merged = src / "merged"
    merged.mkdir()
    lowers = [src / n for n in ls.lower_names()]
    maps = []
    for _ in range(2):
        if which == "kernel":
            ctx = kernel_overlay(lowers, src / "upper", work, merged)
        else:
            args = [":".join(map(str, lowers)), str(src / "upper"), str(work), str(merged)]
            ctx = pyoverlay_mount(args, merged)
        with ctx:
            maps.append(_inode_map(merged))
    changed = [f"{p!r}: {a} -> {maps[1].get(p)}" for p, a in maps[0].items() if maps[1].get(p) != a]
    assert changed[:30] == []


def _inode_map(root: Path) -> dict[bytes, int]:
    base = os.fsencode(root)
    out = {b".": os.lstat(base).st_ino}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, base)] = os.lstat(path).st_ino
    return out


#: Sets whose merged view holds the mixed content, with ``true_elf`` and ``setuid``.
MIXED_SETS = ["ro_1", "rw_1", "ro_3", "rw_6"]


@pytest.mark.parametrize("layer_set", MIXED_SETS, indirect=True)
def test_exec_from_the_mount(layer_set: LayerSet, kernel_side: Side, pyoverlay_side: Side) -> None:
    """A binary and a script in the merged tree run as they do from the kernel mount."""
    got = {}
    for name, side in (("kernel", kernel_side), ("pyoverlay", pyoverlay_side)):
        runs = []
        for rel in ("true_elf", "setuid", "file_644"):
            try:
                res = subprocess.run([str(side.merged / rel)], capture_output=True, timeout=20)
                runs.append((rel, res.returncode))
            except OSError as exc:
                runs.append((rel, errno.errorcode.get(exc.errno or 0, "?")))
        got[name] = runs
    assert got["kernel"] == [("true_elf", 0), ("setuid", 0), ("file_644", "EACCES")]
    assert got["pyoverlay"] == got["kernel"]


#: Per mode: the mount option, and the overlay's own xattr namespace.
XATTR_MODES = {"trusted": (None, "trusted.overlay."), "userxattr": ("userxattr", "user.overlay.")}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", sorted(XATTR_MODES))
def test_escaped_xattrs_as_kernel(mode: str, tmp_path: Path) -> None:
    """A stored ``<ns>overlay.X`` shows as ``<ns>X``; ``<ns>foo`` stays private (kernel 6.7+).

    Names of the *other* mode's namespace are left out on purpose: pyoverlay honours
    both modes' markers and so hides both, where the kernel shows the other mode's.
    """
    option, ns = XATTR_MODES[mode]
    stored = {f"{ns}overlay.nested": b"escaped", f"{ns}foo": b"private", "user.plain": b"p"}
    probes = sorted({*stored, f"{ns}nested", f"{ns}overlay.overlay.nested", "user.none"})
    got = {}
    for name, root in _two_lower_sides(tmp_path, lambda src: _make_xattr_file(src, stored)):
        with _mount_rw(name, root, option) as merged:
            got[name] = (sorted(os.listxattr(merged / "f")), _getxattrs(merged / "f", probes))
    assert got["kernel"][0] == sorted([f"{ns}nested", "user.plain"])
    assert got["pyoverlay"] == got["kernel"]


def _mount_rw(name: str, root: Path, option: str | None) -> contextlib.AbstractContextManager[Path]:
    lowers, upper, work, merged = (
        [root / "l0", root / "l1"],
        root / "upper",
        root / "work",
        root / "merged",
    )
    upper.mkdir()
    work.mkdir()
    if name == "kernel":
        return kernel_overlay(lowers, upper, work, merged, {option: None} if option else None)
    opts = f"lowerdir={lowers[0]}:{lowers[1]},upperdir={upper},workdir={work}"
    return pyoverlay_mount(["-o", opts + (f",{option}" if option else ""), str(merged)], merged)


def _getxattrs(path: Path, names: list[str]) -> dict[str, object]:
    values: dict[str, object] = {}
    for x in names:
        try:
            values[x] = os.getxattr(path, x)
        except OSError as exc:
            values[x] = errno.errorcode.get(exc.errno or 0, "?")
    return values


def _make_xattr_file(src: Path, xattrs: dict[str, bytes]) -> None:
    (src / "l1" / "f").write_text("x\n")
    for name, value in xattrs.items():
        os.setxattr(src / "l1" / "f", name, value)


# -- mount life cycle: background mode, umount, signals ----------------------------------


def _tiny_layers(tmp: Path) -> tuple[list[str], Path]:
    lower, upper, work, merged = (tmp / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    (lower / "hello").write_text("I am from lower\n")
    return [str(lower), str(upper), str(work), str(merged)], merged


def _process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts: our container's init may not reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _process_gone(pid):
            return True
        time.sleep(0.05)
    return False


def _pyoverlay_cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pyoverlay", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=daemon_env(), timeout=30)


@pytest.mark.timeout(60)
def test_background_mount_then_umount(tmp_path: Path) -> None:
    """Without -f the command returns with the mount live; ``pyoverlay umount`` ends it."""
    paths, merged = _tiny_layers(tmp_path)
    pid_file = tmp_path / "daemon.pid"
    pid = None
    try:
        res = _pyoverlay_cli("mount", "--pid-file", str(pid_file), *paths)
        assert res.returncode == 0, res.stderr
        assert is_mounted(merged), "the command returned before the mount was live"
        assert (merged / "hello").read_text() == "I am from lower\n"
        pid = int(pid_file.read_text())
        res = _pyoverlay_cli("umount", str(merged))
        assert res.returncode == 0, res.stderr
        assert not is_mounted(merged)
        assert _wait_gone(pid), "the daemon kept running after umount"
    finally:
        umount_exact(merged, fuse=True)
        if pid is not None and not _process_gone(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_unmounts_cleanly(sig: signal.Signals, tmp_path: Path) -> None:
    """SIGTERM or SIGINT to a foreground daemon unmounts and exits without a traceback."""
    paths, merged = _tiny_layers(tmp_path)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            pyoverlay_command(paths),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=daemon_env(),
            start_new_session=True,
        )
        try:
            assert wait_for_fuse_mount(proc, merged, 30), "did not mount"
            os.kill(proc.pid, sig)
            code = proc.wait(timeout=15)
            log.seek(0)
            output = log.read().decode(errors="replace")
            assert not is_mounted(merged), output
            assert code >= 0, f"killed by signal {-code} instead of exiting; {output}"
            assert "Traceback" not in output, output
        finally:
            umount_exact(merged, fuse=True)
            end_process(proc)


# -- helpers ----------------------------------------------------------------------------


def _sample(paths: list[bytes], limit: int) -> list[bytes]:
    """At most ``limit`` of ``paths``, spread evenly (big sets would be slow via FUSE)."""
    if len(paths) <= limit:
        return paths
    step = len(paths) / limit
    return [paths[int(i * step)] for i in range(limit)]


def _largest_dirs(view: TreeView) -> list[bytes]:
    counts: dict[bytes, int] = {}
    for path in view.nodes:
        if path != b".":
            parent = os.path.dirname(path) or b"."
            counts[parent] = counts.get(parent, 0) + 1
    ranked = sorted(counts, key=lambda d: (-counts[d], d))
    return ranked[:2]


def _check_chunked_readdir(side: Side, view: TreeView) -> None:
    """getdents64 with a small buffer, and seeks to its offsets, give a consistent list."""
    for rel in _largest_dirs(view):
        path = abspath(side.merged, rel)
        fd = open_dir(path)
        try:
            entries, calls = read_entries(fd, bufsize=512)
            names = [e.name for e in entries]
            expected = {
                os.path.basename(p)
                for p in view.nodes
                if p != b"." and (os.path.dirname(p) or b".") == rel
            }
            assert len(names) == len(set(names)), f"{rel!r}: duplicate names from getdents"
            assert set(names) - {b".", b".."} == expected, f"{rel!r}: getdents differs"
            if len(expected) > 200:
                assert calls > 10, "the buffer was meant to force many getdents calls"
            _check_dirents(path, entries)
            _check_seeks(fd, rel, entries)
        finally:
            os.close(fd)
        _check_interleaved(path, rel, names)


def _check_interleaved(path: bytes, rel: bytes, names: list[bytes]) -> None:
    """Two handles on one dir, read in turns, each list every entry exactly once."""
    fds = [open_dir(path), open_dir(path)]
    got: list[list[bytes]] = [[], []]
    try:
        active = [0, 1]
        while active:
            for i in list(active):
                batch = read_batch(fds[i], 512)
                if batch:
                    got[i] += [e.name for e in batch]
                else:
                    active.remove(i)
    finally:
        for fd in fds:
            os.close(fd)
    for listing in got:
        assert sorted(listing) == sorted(names), f"{rel!r}: interleaved reads differ"


def test_readdir_lists_dot_entries(
    kernel_side: Side, pyoverlay_side: Side, kernel_view: TreeView
) -> None:
    """Like the kernel, every directory's listing starts with ``.`` and ``..``."""
    dirs = _sample(tree_paths(kernel_view, "dir"), 50)
    for side in (kernel_side, pyoverlay_side):
        missing = []
        for rel in dirs:
            fd = open_dir(abspath(side.merged, rel))
            try:
                names = [e.name for e in read_entries(fd, bufsize=4096)[0]]
            finally:
                os.close(fd)
            if {b".", b".."} - set(names):
                missing.append(f"{rel!r}: {sorted({b'.', b'..'} - set(names))}")
        assert missing == [], f"{side.merged}: directories without dot entries"


def _check_dirents(path: bytes, entries: list[Dirent]) -> None:
    bad = []
    for e in entries:
        if e.name in (b".", b".."):
            continue
        st = os.lstat(os.path.join(path, e.name))
        kind = KINDS.get(stat.S_IFMT(st.st_mode))
        if e.ino != st.st_ino or (e.kind is not None and e.kind != kind):
            bad.append(f"{e.name!r}: d_ino {e.ino} st_ino {st.st_ino} d_type {e.kind} is {kind}")
    assert bad[:20] == []


def _check_seeks(fd: int, rel: bytes, entries: list[Dirent]) -> None:
    """On the same open dir, reading on from any d_off gives the entries that followed it."""
    names = [e.name for e in entries]
    for k in sorted({0, 1, 2, len(entries) // 3, len(entries) // 2, len(entries) - 2}):
        if not 0 <= k < len(entries) - 1:
            continue
        os.lseek(fd, entries[k].off, os.SEEK_SET)
        rest, _ = read_entries(fd, bufsize=1024)
        assert [e.name for e in rest] == names[k + 1 :], f"{rel!r}: seek to entry {k} offset"
    os.lseek(fd, 0, os.SEEK_SET)  # rewinddir
    again, _ = read_entries(fd, bufsize=4096)
    assert sorted(e.name for e in again) == sorted(names), f"{rel!r}: rewind lists others"


# -- last, once the other checks have read everything -----------------------------------


def test_lower_layers_untouched(pyoverlay_side: Side) -> None:
    """Reading through pyoverlay never writes to a lower layer (data, metadata, xattrs)."""
    diffs = []
    for lower, before in zip(pyoverlay_side.lowers, pyoverlay_side.lowers_before, strict=True):
        diffs += [f"{lower.name}: {d}" for d in diff_views(before, snapshot(lower))]
    assert diffs == [], "\n".join(diffs)


# -- files and paths at the edges ------------------------------------------------------


def _two_lower_sides(tmp: Path, build: Callable[[Path], None]) -> list[tuple[str, Path]]:
    """Lowers ``l0``, ``l1`` built by ``build``, once for a kernel and once for a pyoverlay
    mount (built twice rather than copied: cp fails on paths beyond PATH_MAX)."""
    sides = []
    for name in ("kernel", "pyoverlay"):
        root = tmp / name
        for sub in ("l0", "l1", "merged"):
            (root / sub).mkdir(parents=True)
        build(root)
        sides.append((name, root))
    return sides


def _mount_ro(name: str, root: Path) -> contextlib.AbstractContextManager[Path]:
    lowers = [root / "l0", root / "l1"]
    if name == "kernel":
        return kernel_overlay(lowers, None, None, root / "merged")
    args = ["--read-only", f"{lowers[0]}:{lowers[1]}", str(root / "merged")]
    return pyoverlay_mount(args, root / "merged")


HUGE = 5 << 30
DATA_AT = (4 << 30) + 12345


def _make_sparse(src: Path) -> None:
    with open(src / "l1" / "huge", "wb") as f:
        f.truncate(HUGE)
        f.seek(DATA_AT)
        f.write(b"data past 4 GiB\n" * 256)


def _sparse_answers(path: Path) -> dict[str, object]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        answers: dict[str, object] = {"size": st.st_size, "blocks": st.st_blocks}
        for off in (0, DATA_AT - 3, DATA_AT + 4000, HUGE - 5, HUGE, HUGE + 10):
            answers[f"pread@{off}"] = os.pread(fd, 64, off)
        for whence, label in ((os.SEEK_DATA, "SEEK_DATA"), (os.SEEK_HOLE, "SEEK_HOLE")):
            for off in (0, DATA_AT + 10):
                try:
                    answers[f"{label}@{off}"] = os.lseek(fd, off, whence)
                except OSError as exc:
                    answers[f"{label}@{off}"] = errno.errorcode.get(exc.errno or 0, "?")
        return answers
    finally:
        os.close(fd)


@pytest.mark.timeout(90)
def test_sparse_file_past_4gib(tmp_path: Path) -> None:
    """A 5 GiB sparse lower file: size, blocks, reads past 4 GiB and SEEK_DATA/HOLE."""
    got = {}
    for name, root in _two_lower_sides(tmp_path, _make_sparse):
        with _mount_ro(name, root) as merged:
            got[name] = _sparse_answers(merged / "huge")
    seeks = {k: v for k, v in got["kernel"].items() if k.startswith("SEEK_")}
    size = got["kernel"]["size"]
    # pyfuse3 has no lseek handler, so the kernel answers SEEK_DATA/SEEK_HOLE on a FUSE
    # file generically: all data, one hole at the end (README: Differences).
    generic = {k: (int(k.split("@")[1]) if "DATA" in k else size) for k in seeks}
    assert {k: got["pyoverlay"][k] for k in seeks} == generic
    assert seeks != generic, "the kernel should see the holes of the sparse file"
    others = {k: v for k, v in got["kernel"].items() if k not in seeks}
    assert {k: got["pyoverlay"][k] for k in others} == others


LONG_NAME_LEN = 200
LONG_DEPTH = 30  # about 6000 bytes of path, beyond PATH_MAX


def _long_names() -> list[bytes]:
    return [(b"%02d" % i) + b"n" * (LONG_NAME_LEN - 2) for i in range(LONG_DEPTH)]


def _make_long_chain(src: Path) -> None:
    """The chain in l1, its first half also in l0 with a file of its own at each level."""
    for layer, depth in (("l1", LONG_DEPTH), ("l0", LONG_DEPTH // 2)):
        fd = os.open(src / layer, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i, name in enumerate(_long_names()[:depth]):
                os.mkdir(name, dir_fd=fd)
                nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = nfd
                leaf = os.open(f"{layer}_{i}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
                os.write(leaf, f"{layer} level {i}\n".encode())
                os.close(leaf)
        finally:
            os.close(fd)


def _walk_long_chain(merged: Path) -> list[tuple[object, ...]]:
    """Per level: sorted listing, and each file's mode, size and content (fd-relative)."""
    out: list[tuple[object, ...]] = []
    fd = os.open(merged, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in _long_names():
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
            for entry in sorted(os.listdir(fd)):
                st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
                data = b""
                if stat.S_ISREG(st.st_mode):
                    ffd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
                    data = os.read(ffd, 100)
                    os.close(ffd)
                out.append((entry[:4], st.st_mode, st.st_size, data))
        return out
    finally:
        os.close(fd)


@pytest.mark.timeout(90)
def test_paths_longer_than_path_max(tmp_path: Path) -> None:
    """Names resolved one component at a time work past PATH_MAX, as on the kernel."""
    got = {}
    for name, root in _two_lower_sides(tmp_path, _make_long_chain):
        with _mount_ro(name, root) as merged:
            got[name] = _walk_long_chain(merged)
    # Each level lists the next dir (but the last), l1's file, and l0's in the first half.
    assert len(got["kernel"]) == (LONG_DEPTH - 1) + LONG_DEPTH + LONG_DEPTH // 2
    assert got["pyoverlay"] == got["kernel"]
