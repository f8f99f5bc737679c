"""Comparable snapshots of a mounted tree, and raw getdents64 reads.

Owns what "the same merged view" means in the integration tests: names (bytes), types,
modes, owners, sizes, mtimes, content hashes, symlink targets, xattrs, link counts,
which names share an inode and device numbers. st_dev, atime and ctime are left out;
st_ino is only checked for consistency (equal for hard links, distinct otherwise, and
equal to readdir's d_ino). Nothing here follows a symlink.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import os
import stat
import struct
from collections import defaultdict
from pathlib import Path

KINDS = {
    stat.S_IFDIR: "dir",
    stat.S_IFREG: "file",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFSOCK: "sock",
}
#: d_type values from <dirent.h>, keyed like KINDS.
DTYPES = {1: "fifo", 2: "chr", 4: "dir", 6: "blk", 8: "file", 10: "symlink", 12: "sock"}


@dataclasses.dataclass(frozen=True)
class Node:
    """Everything compared about one name in the tree."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    blocks: int
    blksize: int
    nlink: int
    mtime_ns: int
    sha256: str | None = None
    target: bytes | None = None
    rdev: tuple[int, int] | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    errors: tuple[str, ...] = ()


@dataclasses.dataclass
class TreeView:
    """A whole tree: nodes by relative path (root is ``b"."``) plus inode facts."""

    nodes: dict[bytes, Node]
    #: Groups of two or more names that report the same st_ino.
    links: frozenset[frozenset[bytes]]
    #: Inode inconsistencies found while walking (d_ino != st_ino, ...).
    problems: list[str]
    #: st_ino of each path as the walk saw it (compared only with itself, never across
    #: mounts, since the numbers are the filesystem's own).
    inos: dict[bytes, int] = dataclasses.field(default_factory=dict)


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def read_xattrs(path: bytes) -> tuple[tuple[str, bytes], ...]:
    """All xattrs listed for ``path`` (not following a symlink), sorted by name."""
    names = os.listxattr(path, follow_symlinks=False)
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))


def file_sha256(path: bytes) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def describe(path: bytes, st: os.stat_result) -> Node:
    """The Node for ``path`` whose lstat result is ``st``."""
    kind = KINDS.get(stat.S_IFMT(st.st_mode), f"type{stat.S_IFMT(st.st_mode):o}")
    extra: dict[str, object] = {}
    errors = []
    try:
        if kind == "file":
            extra["sha256"] = file_sha256(path)
        elif kind == "symlink":
            extra["target"] = os.readlink(path)
        elif kind in ("chr", "blk"):
            extra["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    except OSError as exc:
        errors.append(f"content: {_errname(exc)}")
    try:
        extra["xattrs"] = read_xattrs(path)
    except OSError as exc:
        errors.append(f"xattrs: {_errname(exc)}")
    return Node(
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size,
        blocks=st.st_blocks,
        blksize=st.st_blksize,
        nlink=st.st_nlink,
        mtime_ns=st.st_mtime_ns,
        errors=tuple(errors),
        **extra,  # type: ignore[arg-type]
    )


def snapshot(root: str | os.PathLike[str]) -> TreeView:
    """Walk the tree at ``root`` and return its comparable view."""
    base = os.fsencode(root)
    nodes: dict[bytes, Node] = {}
    inodes: dict[int, list[bytes]] = defaultdict(list)
    problems: list[str] = []
    root_st = os.lstat(base)
    nodes[b"."] = describe(base, root_st)
    inodes[root_st.st_ino].append(b".")
    pending = [b""]
    while pending:
        rel_dir = pending.pop()
        try:
            entries = list(os.scandir(os.path.join(base, rel_dir) if rel_dir else base))
        except OSError as exc:
            problems.append(f"{rel_dir!r}: readdir failed: {_errname(exc)}")
            continue
        for entry in entries:
            rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
            _visit(entry, rel, nodes, inodes, problems, pending)
    inos = {path: ino for ino, paths in inodes.items() for path in paths}
    return TreeView(nodes, _link_groups(inodes, nodes, problems), problems, inos)


def _visit(
    entry: os.DirEntry[bytes],
    rel: bytes,
    nodes: dict[bytes, Node],
    inodes: dict[int, list[bytes]],
    problems: list[str],
    pending: list[bytes],
) -> None:
    if rel in nodes:
        problems.append(f"{rel!r}: listed twice by readdir")
        return
    try:
        st = os.lstat(entry.path)
    except OSError as exc:
        nodes[rel] = Node("unstatable", 0, 0, 0, 0, 0, 0, 0, 0, errors=(f"lstat: {_errname(exc)}",))
        return
    if entry.inode() != st.st_ino:
        problems.append(f"{rel!r}: d_ino {entry.inode()} != st_ino {st.st_ino}")
    node = describe(entry.path, st)
    dtype_kind = _dirent_kind(entry)
    if dtype_kind is not None and dtype_kind != node.kind:
        problems.append(f"{rel!r}: d_type says {dtype_kind}, lstat says {node.kind}")
    nodes[rel] = node
    inodes[st.st_ino].append(rel)
    if node.kind == "dir":
        pending.append(rel)


def _dirent_kind(entry: os.DirEntry[bytes]) -> str | None:
    """The type readdir reported, as far as os.DirEntry exposes it without a stat."""
    # DirEntry caches d_type; is_symlink/is_dir(follow_symlinks=False) read only that.
    if entry.is_symlink():
        return "symlink"
    if entry.is_dir(follow_symlinks=False):
        return "dir"
    if entry.is_file(follow_symlinks=False):
        return "file"
    return None


def _link_groups(
    inodes: dict[int, list[bytes]], nodes: dict[bytes, Node], problems: list[str]
) -> frozenset[frozenset[bytes]]:
    groups = []
    for ino, names in inodes.items():
        if len(names) < 2:
            continue
        groups.append(frozenset(names))
        kinds = {nodes[n].kind for n in names}
        if "dir" in kinds or len(kinds) > 1:
            problems.append(f"st_ino {ino} shared by unrelated objects {sorted(names)!r}")
        elif any(nodes[n].nlink < len(names) for n in names):
            problems.append(f"st_ino {ino} shared by {sorted(names)!r} but nlink is lower")
    return frozenset(groups)


def diff_views(
    expected: TreeView,
    actual: TreeView,
    *,
    ignore_dir_size: bool = False,
    ignore_root_nlink: bool = False,
    limit: int = 40,
) -> list[str]:
    """Human-readable differences between two views, at most ``limit`` lines (+ a count)."""
    out: list[str] = []
    if ignore_root_nlink and b"." in actual.nodes and b"." in expected.nodes:
        root = dataclasses.replace(actual.nodes[b"."], nlink=expected.nodes[b"."].nlink)
        actual = dataclasses.replace(actual, nodes={**actual.nodes, b".": root})
    for path in sorted(expected.nodes.keys() - actual.nodes.keys()):
        out.append(f"missing {path!r} ({expected.nodes[path].kind})")
    for path in sorted(actual.nodes.keys() - expected.nodes.keys()):
        out.append(f"unexpected {path!r} ({actual.nodes[path].kind})")
    for path in sorted(expected.nodes.keys() & actual.nodes.keys()):
        out += _diff_node(path, expected.nodes[path], actual.nodes[path], ignore_dir_size)
    for group in sorted(expected.links - actual.links, key=sorted):
        out.append(f"hard links {sorted(group)!r} do not share one st_ino")
    for group in sorted(actual.links - expected.links, key=sorted):
        out.append(f"names {sorted(group)!r} share an st_ino but are not hard links")
    if len(out) > limit:
        out = [*out[:limit], f"... and {len(out) - limit} more differences"]
    return out


def _diff_node(path: bytes, want: Node, got: Node, ignore_dir_size: bool) -> list[str]:
    out = []
    for field in dataclasses.fields(Node):
        a, b = getattr(want, field.name), getattr(got, field.name)
        if field.name == "size" and want.kind == "dir" and ignore_dir_size:
            continue
        if field.name == "blocks" and want.kind == "dir":
            # The kernel stores origin xattrs in upper dirs as it looks them up, which can
            # add an xattr block to the dir on its side only.
            continue
        if a != b:
            if field.name == "mode":
                a, b = oct(a), oct(b)
            out.append(f"{path!r}: {field.name} kernel={a!r} pyoverlay={b!r}")
    return out


# -- raw getdents64, to read a directory in several small calls ---------------------

_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61, "riscv64": 61, "ppc64le": 202, "s390x": 220}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_HEADER = struct.Struct("=QqHB")


@dataclasses.dataclass(frozen=True)
class Dirent:
    ino: int
    off: int
    kind: str | None
    name: bytes


def _getdents_once(fd: int, bufsize: int) -> list[Dirent]:
    buf = ctypes.create_string_buffer(bufsize)
    n = _libc.syscall(_SYS_GETDENTS64[os.uname().machine], fd, buf, bufsize)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    out, pos, raw = [], 0, buf.raw[:n]
    while pos < n:
        ino, off, reclen, dtype = _HEADER.unpack_from(raw, pos)
        name = raw[pos + _HEADER.size : pos + reclen].split(b"\0", 1)[0]
        out.append(Dirent(ino, off, DTYPES.get(dtype), name))
        pos += reclen
    return out


def read_batch(fd: int, bufsize: int = 512) -> list[Dirent]:
    """One getdents64 call on an open directory; empty at the end."""
    return _getdents_once(fd, bufsize)


def read_entries(fd: int, *, bufsize: int = 512) -> tuple[list[Dirent], int]:
    """Read an open directory to its end with getdents64 and a small buffer.

    Returns the entries (including ``.`` and ``..``) and how many calls it took.
    """
    entries: list[Dirent] = []
    calls = 0
    while batch := _getdents_once(fd, bufsize):
        entries += batch
        calls += 1
    return entries, calls


def open_dir(path: str | bytes | os.PathLike[str]) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def tree_paths(view: TreeView, kind: str | None = None) -> list[bytes]:
    """Sorted paths in ``view``, optionally only those of one kind."""
    return sorted(p for p, n in view.nodes.items() if kind is None or n.kind == kind)


def abspath(root: str | os.PathLike[str], rel: bytes) -> bytes:
    return os.fsencode(Path(root)) if rel == b"." else os.path.join(os.fsencode(root), rel)
