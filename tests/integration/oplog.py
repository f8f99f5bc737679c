"""Differential write tests: one operation sequence run on kernel overlayfs and on pyoverlay.

Owns the write-path comparison. :func:`build_write_set` writes three lowers plus an upper
that hold every object type, hard links, whiteouts, opaque, merged and lower-only
directories. :class:`Pair` mounts two ``cp -a`` copies of it (kernel with the pinned
options, pyoverlay through its CLI), :func:`apply` runs one :class:`Op` on a mount and
returns a comparable :class:`Outcome` (a normalised value or an errno name), and
:meth:`Pair.finish` compares the final merged trees and, after unmounting, the upper and
work directories.

What the comparisons ignore (only the kernel writes them, or they cannot match between
two copies): the xattrs in :data:`IGNORED_UPPER_XATTRS`, atime and ctime, raw inode
numbers, the exact value of an mtime set by the clock (both sides must agree whether an
mtime is still the layer's or was set during the test), an st_blocks surplus of exactly
one block on the kernel side (the ext4 xattr block its origin xattr can need), and a
whiteout's link count (the kernel hard-links its whiteouts to one shared inode).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import os
import pickle
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from layersets import Builder
from mounts import MountError, kernel_overlay, pyoverlay_mount, umount_exact
from treeview import Node, TreeView, diff_views, snapshot

#: xattrs only the kernel writes in upper (or that name a filesystem), left out of the
#: upper comparison: origin file handles, impure/nlink bookkeeping, the layer uuid.
IGNORED_UPPER_XATTRS = frozenset(
    prefix + name
    for prefix in ("trusted.overlay.", "user.overlay.")
    for name in ("origin", "impure", "nlink", "uuid", "upper", "metacopy")
)
#: One 4 KiB filesystem block in st_blocks units (device nodes report other blksizes).
XATTR_BLOCK_SECTORS = 4096 // 512
#: mtimes at or after this (set by the clock during a test) compare as "new".
RECENT = -1

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(ret: int) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def renameat2(old: bytes, new: bytes, flags: int) -> None:
    _check(_libc.renameat2(AT_FDCWD, old, AT_FDCWD, new, ctypes.c_uint(flags)))


def utimensat(path: bytes, atime: int | str, mtime: int | str, *, nofollow: bool = True) -> None:
    """utimensat(2) with ``"now"``/``"omit"`` for UTIME_NOW/UTIME_OMIT."""
    times = (_Timespec * 2)()
    for ts, value in zip(times, (atime, mtime), strict=True):
        if value == "now":
            ts.tv_sec, ts.tv_nsec = 0, UTIME_NOW
        elif value == "omit":
            ts.tv_sec, ts.tv_nsec = 0, UTIME_OMIT
        else:
            ts.tv_sec, ts.tv_nsec = divmod(int(value), 10**9)
    flags = AT_SYMLINK_NOFOLLOW if nofollow else 0
    _check(_libc.utimensat(AT_FDCWD, path, times, flags))


def fallocate(fd: int, offset: int, length: int) -> None:
    _check(_libc.fallocate(fd, 0, ctypes.c_long(offset), ctypes.c_long(length)))


# -- the layer set --------------------------------------------------------------------

#: A VFS_CAP_REVISION_2 security.capability value: cap_net_raw, permitted + effective.
CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def build_write_set(root: Path, prefix: str = "trusted.overlay.") -> Path:
    """Three lowers (``l0`` top .. ``l2``) plus ``upper`` under ``root``; returns ``root``.

    ``prefix`` is the namespace of the markers (``user.overlay.`` for userxattr mounts).
    """
    root.mkdir(parents=True)
    b = Builder(root, "kernel", prefix)
    for name in ("l0", "l1", "l2", "upper"):
        b.dir(name)
    _bottom(b)
    _middle_and_top(b)
    _upper(b)
    b.freeze_times()
    return root


def _bottom(b: Builder) -> None:
    for i in range(3):
        b.file(f"l2/d/f{i}", f"l2 f{i}\n".encode())
    b.dir("l2/d", xattrs={"user.dx": b"dir xattr"})
    b.file("l2/d/sub/deep/leaf", b"deep leaf\n")
    b.file("l2/hl_a", b"linked twice\n", 0o640, (1000, 100))
    b.hardlink("l2/hl_a", "l2/hl_b")
    b.file("l2/big", bytes(range(256)) * 800)
    b.node("l2/fifo", stat.S_IFIFO, 0o640)
    b.node("l2/chr", stat.S_IFCHR, 0o666, os.makedev(1, 3))
    # A loop device number nothing uses, so that an open of it can only fail.
    b.node("l2/blk", stat.S_IFBLK, 0o660, os.makedev(7, 255), (0, 6))
    b.node("l2/sock", stat.S_IFSOCK, 0o755)
    b.symlink("l2/sym", "d/f0")
    b.symlink("l2/dangling", "nowhere", (1000, 1000))
    b.file("l2/xat", b"x\n", xattrs={"user.a": b"1", "user.b": b"2", "trusted.t": b"3"})
    b.dir("l2/sgid", 0o2777, (0, 100))
    b.file("l2/ro", b"read only\n", 0o444, (1000, 1000))
    b.file("l2/suid", b"#!/bin/sh\n", 0o4755)
    b.file("l2/suid_user", b"#!/bin/sh\n", 0o6777, (1000, 1000))
    b.file("l2/capfile", b"\x7fELF", 0o755, xattrs={"security.capability": CAP_NET_RAW})
    b.dir("l2/emptydir", 0o750)
    b.file("l2/ldir/x", b"ldir x\n")
    b.file("l2/ldir/y/z", b"ldir z\n")
    b.file("l2/m/from2", b"2\n")
    b.file("l2/wh_target", b"whited out in l1\n")
    b.file("l2/gone/inner", b"whited out dir\n")
    b.file("l2/opq/hidden", b"below opaque\n")
    b.file("l2/uo/hidden", b"below upper opaque\n")


def _middle_and_top(b: Builder) -> None:
    b.file("l1/d/l1file", b"l1\n")
    b.file("l1/m/from1", b"1\n")
    b.dir("l1/m", 0o775, (1000, 1000))
    b.whiteout("l1/wh_target")
    b.opaque("l1/opq")
    b.file("l1/opq/shown", b"l1 opaque\n")
    b.file("l1/l1only/inner", b"l1 only\n")
    b.file("l0/d/f1", b"l0 wins\n")
    b.file("l0/m/from0", b"0\n")
    b.file("l0/top", b"top\n")
    b.whiteout("l0/gone")
    b.file("l0/exec", b"#!/bin/true\n", 0o755)


def _upper(b: Builder) -> None:
    b.file("upper/u_file", b"upper file\n", 0o600)
    b.file("upper/u_dir/u_inner", b"u\n")
    b.dir("upper/u_empty")
    b.file("upper/m/from_u", b"u\n")
    b.whiteout("upper/d/f2")
    b.opaque("upper/uo")
    b.file("upper/uo/u", b"upper opaque\n")


# -- operations -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation: a name from :data:`OPS` and its arguments (paths are relative)."""

    name: str
    args: tuple[Any, ...] = ()

    def __str__(self) -> str:
        return f"{self.name}{self.args!r}"


def op(name: str, *args: Any) -> Op:
    return Op(name, args)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """``ok`` with a normalised value, or ``err`` with an errno name."""

    status: str
    value: Any = None

    def __str__(self) -> str:
        return f"{self.status}:{self.value!r}"


class Ctx:
    """One side's mount root, clock threshold and inode labels."""

    def __init__(self, root: Path, since_ns: int):
        self.root = os.fsencode(root)
        self.since_ns = since_ns
        self.inos: dict[int, str] = {}

    def p(self, rel: str | bytes) -> bytes:
        rel = os.fsencode(rel)
        return self.root if rel in (b"", b".") else os.path.join(self.root, rel)

    def ino(self, number: int) -> str:
        return self.inos.setdefault(number, f"i{len(self.inos)}")

    def when(self, ns: int) -> int:
        return RECENT if ns >= self.since_ns else ns


#: Every open is non-blocking, so a FIFO answers (ENXIO, or EOF) instead of hanging.
_NB = os.O_CLOEXEC | os.O_NONBLOCK


def _kind(mode: int) -> str:
    return stat.filemode(mode)[0]


def _stat_value(c: Ctx, st: os.stat_result, *, times: bool = True) -> tuple:
    size = st.st_size if not stat.S_ISDIR(st.st_mode) else -1
    value = (_kind(st.st_mode), oct(st.st_mode & 0o7777), st.st_uid, st.st_gid, size)
    value += (st.st_nlink, c.ino(st.st_ino))
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        value += (os.major(st.st_rdev), os.minor(st.st_rdev))
    if times:
        value += (c.when(st.st_mtime_ns),)
    return value


def _open_close(c: Ctx, path: str, flags: int, mode: int = 0o644) -> int:
    fd = os.open(c.p(path), flags | _NB, mode)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _write(c: Ctx, path: str, offset: int, data: bytes, flags: int = os.O_WRONLY) -> int:
    fd = os.open(c.p(path), flags | _NB)
    try:
        return os.pwrite(fd, data, offset) if offset >= 0 else os.write(fd, data)
    finally:
        os.close(fd)


def _read(c: Ctx, path: str) -> str:
    fd = os.open(c.p(path), os.O_RDONLY | _NB)
    try:
        data = b""
        while chunk := os.read(fd, 1 << 20):
            data += chunk
    finally:
        os.close(fd)
    return f"{len(data)}:{hashlib.sha256(data).hexdigest()[:16]}"


def _fsync(c: Ctx, path: str, flags: int) -> None:
    fd = os.open(c.p(path), flags | _NB)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _statfs(c: Ctx) -> tuple:
    vfs = os.statvfs(c.root)
    return (vfs.f_bsize, vfs.f_frsize, vfs.f_blocks, vfs.f_files, vfs.f_namemax)


def _utimens(c: Ctx, path: str, atime: int | str, mtime: int | str) -> tuple:
    utimensat(c.p(path), atime, mtime)
    st = os.lstat(c.p(path))
    if stat.S_ISLNK(st.st_mode):
        # pyoverlay's readlink(2) of a lower symlink sets its atime (see
        # test_write_ops.test_readlink_sets_lower_symlink_atime): not compared.
        return ("symlink atime", c.when(st.st_mtime_ns))
    return (c.when(st.st_atime_ns), c.when(st.st_mtime_ns))


def _fallocate(c: Ctx, path: str, offset: int, length: int) -> int:
    fd = os.open(c.p(path), os.O_WRONLY | _NB)
    try:
        fallocate(fd, offset, length)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _as_user(c: Ctx, uid: int, gid: int, umask: int, inner: Op) -> Any:
    """Run ``inner`` in a child with the given credentials and umask."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            # Test directories are 0700: reach the mount before giving up root.
            os.chdir(c.root)
            c.root = b"."
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.umask(umask)
            result = apply(c, inner)
            os.write(w, pickle.dumps((result, c.inos)))
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        raise RuntimeError(f"as_user child failed (status {status})")
    result, inos = pickle.loads(data)
    c.inos.update(inos)
    if result.status == "err":
        raise OSError(getattr(errno, result.value, errno.EIO), result.value)
    return result.value


def _ftruncate(c: Ctx, path: str, size: int) -> int:
    """truncate through an open fd (FUSE setattr with a file handle)."""
    fd = os.open(c.p(path), os.O_RDWR | _NB)
    try:
        os.ftruncate(fd, size)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _read_across_copy_up(c: Ctx, path: str, data: bytes) -> tuple[bytes, bytes]:
    """Open read-only, copy up by writing through a second fd, read from the first fd:
    read(2) on the old fd sees the new data (not so for an mmap, which is not tried)."""
    rfd = os.open(c.p(path), os.O_RDONLY | _NB)
    try:
        before = os.pread(rfd, len(data), 0)
        _write(c, path, 0, data)
        return before, os.pread(rfd, len(data), 0)
    finally:
        os.close(rfd)


def _mknod(c: Ctx, path: str, kind: str, mode: int, major: int = 0, minor: int = 0) -> None:
    bits = {"fifo": stat.S_IFIFO, "chr": stat.S_IFCHR, "blk": stat.S_IFBLK, "sock": stat.S_IFSOCK}
    os.mknod(c.p(path), bits[kind] | mode, os.makedev(major, minor))


def _created_stat(c: Ctx, path: str) -> tuple:
    return _stat_value(c, os.lstat(c.p(path)))


OPS: dict[str, Callable[..., Any]] = {
    "create": lambda c, p, mode=0o644: _open_close(
        c, p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode
    ),
    "open_w": lambda c, p: _open_close(c, p, os.O_WRONLY),
    "open_rw": lambda c, p: _open_close(c, p, os.O_RDWR),
    "open_trunc": lambda c, p: _open_close(c, p, os.O_WRONLY | os.O_TRUNC),
    "open_r": lambda c, p: _open_close(c, p, os.O_RDONLY),
    "open_r_trunc": lambda c, p: _open_close(c, p, os.O_RDONLY | os.O_TRUNC),
    "open_creat": lambda c, p: _open_close(c, p, os.O_RDONLY | os.O_CREAT, 0o644),
    "write": lambda c, p, off, data: _write(c, p, off, data),
    "append": lambda c, p, data: _write(c, p, -1, data, os.O_WRONLY | os.O_APPEND),
    "truncate": lambda c, p, size: os.truncate(c.p(p), size),
    "ftruncate": _ftruncate,
    "read_across_copy_up": _read_across_copy_up,
    "read": _read,
    "mknod": _mknod,
    "mkdir": lambda c, p, mode=0o755: os.mkdir(c.p(p), mode),
    "symlink": lambda c, target, p: os.symlink(os.fsencode(target), c.p(p)),
    "link": lambda c, src, dst: os.link(c.p(src), c.p(dst), follow_symlinks=False),
    "unlink": lambda c, p: os.unlink(c.p(p)),
    "rmdir": lambda c, p: os.rmdir(c.p(p)),
    "rename": lambda c, src, dst, flags=0: renameat2(c.p(src), c.p(dst), flags),
    "chmod": lambda c, p, mode: os.chmod(c.p(p), mode),
    "chown": lambda c, p, uid, gid: os.chown(c.p(p), uid, gid, follow_symlinks=False),
    "utimens": _utimens,
    "setxattr": lambda c, p, name, value, flags=0: os.setxattr(
        c.p(p), name, value, flags, follow_symlinks=False
    ),
    "removexattr": lambda c, p, name: os.removexattr(c.p(p), name, follow_symlinks=False),
    "getxattr": lambda c, p, name: os.getxattr(c.p(p), name, follow_symlinks=False),
    "listxattr": lambda c, p: sorted(os.listxattr(c.p(p), follow_symlinks=False)),
    "fsync": lambda c, p, write=False: _fsync(c, p, os.O_WRONLY if write else os.O_RDONLY),
    "fsyncdir": lambda c, p: _fsync(c, p, os.O_RDONLY | os.O_DIRECTORY),
    "fallocate": _fallocate,
    "stat": lambda c, p: _stat_value(c, os.lstat(c.p(p))),
    "stat_ino": lambda c, p: c.ino(os.lstat(c.p(p)).st_ino),
    "new_stat": _created_stat,
    "listdir": lambda c, p: sorted(os.listdir(c.p(p))),
    "readlink": lambda c, p: os.readlink(c.p(p)),
    "statfs": _statfs,
    "as_user": _as_user,
}


def apply(c: Ctx, o: Op) -> Outcome:
    """Run ``o`` on the mount in ``c`` and return what happened, comparably."""
    try:
        value = OPS[o.name](c, *o.args)
    except OSError as exc:
        return Outcome("err", errno.errorcode.get(exc.errno or 0, str(exc.errno)))
    return Outcome("ok", value)


# -- snapshots ------------------------------------------------------------------------


def settle_times(view: TreeView, since_ns: int) -> TreeView:
    """``view`` with every mtime set by the clock during the test replaced by RECENT."""
    nodes = {
        path: dataclasses.replace(node, mtime_ns=RECENT) if node.mtime_ns >= since_ns else node
        for path, node in view.nodes.items()
    }
    return dataclasses.replace(view, nodes=nodes)


def forgive_xattr_block(want: TreeView, got: TreeView) -> TreeView:
    """``got`` with st_blocks taken from ``want`` where they differ by one block.

    The kernel's own xattrs (origin, impure) can push an object's xattrs out of the
    ext4 inode into an extra block, which shows in st_blocks on its side only.
    """
    nodes = dict(got.nodes)
    for path, node in got.nodes.items():
        other = want.nodes.get(path)
        if other is not None and other.blocks - node.blocks == XATTR_BLOCK_SECTORS:
            nodes[path] = dataclasses.replace(node, blocks=other.blocks)
    return dataclasses.replace(got, nodes=nodes)


def merged_view(root: Path, since_ns: int) -> TreeView:
    return settle_times(snapshot(root), since_ns)


def _upper_node(node: Node, keep_redirect: bool) -> Node:
    drop = set(IGNORED_UPPER_XATTRS)
    if not keep_redirect:
        drop.add("trusted.overlay.redirect")
    xattrs = tuple((n, v) for n, v in node.xattrs if n not in drop)
    return dataclasses.replace(node, xattrs=xattrs)


def _is_whiteout(node: Node) -> bool:
    return node.kind == "chr" and node.rdev == (0, 0)


def upper_view(upper: Path, since_ns: int, *, keep_redirect: bool = True) -> TreeView:
    """The raw upper directory, with kernel-only bookkeeping left out.

    Besides the xattrs in IGNORED_UPPER_XATTRS: the kernel makes its whiteouts hard
    links of one shared whiteout inode (kept in the work dir), so a whiteout's link
    count and which whiteouts share an inode are not compared.
    """
    view = settle_times(snapshot(upper), since_ns)
    nodes = {}
    for path, node in view.nodes.items():
        node = _upper_node(node, keep_redirect)
        nodes[path] = dataclasses.replace(node, nlink=1) if _is_whiteout(node) else node
    links = frozenset(g for g in view.links if not any(_is_whiteout(nodes[p]) for p in g))
    return dataclasses.replace(view, nodes=nodes, links=links, problems=[])


def work_leftovers(work: Path) -> list[str]:
    """Entries left inside WORK/work, except the kernel's shared whiteout (a char 0/0)."""
    inner = work / "work"
    if not inner.is_dir():
        return []
    out = []
    for entry in os.scandir(inner):
        st = entry.stat(follow_symlinks=False)
        if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
            out.append(entry.name)
    return sorted(out)


# -- the pair of mounts ---------------------------------------------------------------


@dataclasses.dataclass
class Mounted:
    """One side: its copy of the layers and its mount."""

    name: str
    root: Path
    ctx: Ctx

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def upper(self) -> Path:
        return self.root / "upper"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def lowers(self) -> list[Path]:
        return [self.root / f"l{i}" for i in range(3)]


def copy_layers(src: Path, dest: Path) -> Path:
    """``cp -a`` of a built set, with its times stamped again.

    Reading the source for the first copy updates its atimes (relatime), which a second
    ``cp -a`` would carry over: stamping each copy keeps the two sides identical.
    """
    subprocess.run(["cp", "-a", "--", str(src), str(dest)], check=True)
    Builder(dest, "kernel").freeze_times()
    for name in ("merged", "work"):
        (dest / name).mkdir(exist_ok=True)
    return dest


def kernel_mount(
    side: Mounted, redirect: bool, userxattr: bool = False
) -> contextlib.AbstractContextManager[Path]:
    extra: dict[str, str | None] = {"redirect_dir": "on"} if redirect else {}
    if userxattr:
        extra["userxattr"] = None
    return kernel_overlay(side.lowers, side.upper, side.work, side.merged, extra)


def pyoverlay_mount_side(
    side: Mounted, redirect: bool, extra: Sequence[str] = ()
) -> contextlib.AbstractContextManager[Path]:
    opts = [
        "lowerdir=" + ":".join(str(p) for p in side.lowers),
        f"upperdir={side.upper}",
        f"workdir={side.work}",
        *(["redirect_dir=on"] if redirect else []),
        *extra,
    ]
    return pyoverlay_mount(["-o", ",".join(opts), str(side.merged)], side.merged)


class Pair:
    """Kernel overlayfs and pyoverlay over two copies of one layer set.

    Use as a context manager; :meth:`run` applies operations to both sides and
    collects divergences, :meth:`finish` compares the merged trees, unmounts, and
    compares upper and work directories. Everything mounted is unmounted on exit.
    """

    def __init__(self, src: Path, base: Path, *, redirect: bool = False, userxattr: bool = False):
        self.redirect = redirect
        self.userxattr = userxattr
        self.since_ns = time.time_ns()
        self.kernel = Mounted("kernel", copy_layers(src, base / "kernel"), None)  # type: ignore[arg-type]
        self.py = Mounted("pyoverlay", copy_layers(src, base / "pyoverlay"), None)  # type: ignore[arg-type]
        for side in (self.kernel, self.py):
            side.ctx = Ctx(side.merged, self.since_ns)
        self.divergences: list[str] = []
        self.log: list[str] = []
        self._stack = contextlib.ExitStack()
        self.mounted = False

    def __enter__(self) -> Pair:
        try:
            self._stack.enter_context(kernel_mount(self.kernel, self.redirect, self.userxattr))
            extra = ["userxattr"] if self.userxattr else []
            self._stack.enter_context(pyoverlay_mount_side(self.py, self.redirect, extra))
        except BaseException:
            self._stack.close()
            raise
        self.mounted = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()

    def unmount(self) -> None:
        self._stack.close()
        self.mounted = False
        # Belt and braces: nothing of ours may stay mounted whatever happened above.
        umount_exact(self.kernel.merged, fuse=False)
        umount_exact(self.py.merged, fuse=True)

    def step(self, o: Op) -> tuple[Outcome, Outcome]:
        """Apply ``o`` to both sides; record a divergence if the outcomes differ."""
        k = apply(self.kernel.ctx, o)
        p = apply(self.py.ctx, o)
        self.log.append(f"{o} -> kernel {k}")
        if k != p:
            self.divergences.append(f"{o}: kernel {k}, pyoverlay {p}")
        return k, p

    def run(self, ops: Sequence[Op]) -> list[str]:
        for o in ops:
            self.step(o)
        return self.divergences

    def merged_diff(self) -> list[str]:
        snapshot(self.kernel.merged)  # the kernel settles origin xattrs on the first walk
        want = merged_view(self.kernel.merged, self.since_ns)
        got = merged_view(self.py.merged, self.since_ns)
        out = [f"merged: {d}" for d in diff_views(want, forgive_xattr_block(want, got))]
        extra = sorted(set(got.problems) - set(want.problems))
        out += [f"merged inode problem: {p}" for p in extra]
        return out

    def finish(self) -> list[str]:
        """Compare merged trees, unmount both, compare upper and work; all divergences."""
        out = list(self.divergences)
        out += self.merged_diff()
        self.unmount()
        out += self.upper_diff()
        return out

    def upper_diff(self) -> list[str]:
        want = upper_view(self.kernel.upper, self.since_ns, keep_redirect=self.redirect)
        got = upper_view(self.py.upper, self.since_ns, keep_redirect=self.redirect)
        out = [f"upper: {d}" for d in diff_views(want, forgive_xattr_block(want, got))]
        kw, pw = work_leftovers(self.kernel.work), work_leftovers(self.py.work)
        if kw != pw:
            out.append(f"work/work: kernel {kw!r}, pyoverlay {pw!r}")
        return out


@contextlib.contextmanager
def pair(
    src: Path, base: Path, *, redirect: bool = False, userxattr: bool = False
) -> Iterator[Pair]:
    with Pair(src, base, redirect=redirect, userxattr=userxattr) as p:
        yield p


def differential(
    src: Path, base: Path, ops: Sequence[Op], *, redirect: bool = False, userxattr: bool = False
) -> list[str]:
    """Run ``ops`` on both implementations; every divergence found, as text."""
    with pair(src, base, redirect=redirect, userxattr=userxattr) as p:
        p.run(ops)
        return p.finish()


__all__ = ["MountError", "Op", "Outcome", "Pair", "apply", "build_write_set", "differential", "op"]
