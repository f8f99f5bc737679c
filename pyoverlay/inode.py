"""Attributes: inode numbers, getattr and setattr, as the kernel's ``inode.c`` decides them.

Inode numbers follow the kernel's rule for layers on one filesystem: an object reports
the inode number of its real file, and keeps the number of its lower origin after a
copy-up (remembered for the life of the mount). When the layers span filesystems, the
layer's filesystem index goes into the high bits, as the kernel's ``xino`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import os
import stat
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pyoverlay.copy_up import copy_up
from pyoverlay.util import O_PATH, fd_path

if TYPE_CHECKING:
    from pyoverlay.overlay import Overlay

#: FUSE reserves 0 and gives 1 to the root; numbers from here are handed out for real
#: inode numbers that do not fit the scheme.
_OVERFLOW_BASE = 1 << 63
_FSID_SHIFT = 56


@dataclasses.dataclass(frozen=True, slots=True)
class Attributes:
    """What getattr answers: the merged object's number, its real stat and its link count."""

    ino: int
    st: os.stat_result
    nlink: int


class InodeNumbers:
    """Maps real objects (st_dev, st_ino) to the numbers the mount reports."""

    def __init__(self, devices: list[int]):
        self._fsids = {dev: i for i, dev in enumerate(dict.fromkeys(devices))}
        self._overflow: dict[tuple[int, int], int] = {}
        self._counter = itertools.count(_OVERFLOW_BASE)
        #: Copied-up objects keep the number they had before copy-up.
        self._origins: dict[tuple[int, int], int] = {}
        #: Numbers of objects that went away while the kernel may still hold them. The
        #: upper file system reuses inode numbers at once; FUSE tells a new object from
        #: the dead one only by a different generation (else it takes the new object for
        #: the old inode: stale pages, ESTALE or EEXIST on a reused directory).
        self._generations: dict[int, int] = {}

    def number(self, st: os.stat_result) -> int:
        key = (st.st_dev, st.st_ino)
        kept = self._origins.get(key)
        if kept is not None:
            return kept
        fsid = self._fsids.get(st.st_dev)
        if fsid is not None and 1 < st.st_ino < (1 << _FSID_SHIFT):
            return st.st_ino | (fsid << _FSID_SHIFT)
        number = self._overflow.get(key)
        if number is None:
            number = self._overflow[key] = next(self._counter)
        return number

    def keep(self, new: os.stat_result, number: int) -> None:
        """After a copy-up, let the new upper object report its old number."""
        self._origins[(new.st_dev, new.st_ino)] = number

    def release(self, st: os.stat_result) -> None:
        """The upper object is gone; its inode number may be reused for something else."""
        number = self.number(st)
        self._generations[number] = self._generations.get(number, 0) + 1
        self._origins.pop((st.st_dev, st.st_ino), None)
        self._overflow.pop((st.st_dev, st.st_ino), None)

    def generation(self, number: int) -> int:
        """The FUSE generation of ``number``: how often an object with it went away."""
        return self._generations.get(number, 0)

    def forgotten(self, number: int) -> None:
        """The kernel holds no inode with ``number`` any more: a fresh start is safe."""
        self._generations.pop(number, None)


@dataclasses.dataclass(slots=True)
class AttrChange:
    """A setattr request: only the fields that are not None change."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    #: Keep the other timestamp as it is (UTIME_OMIT) when only one is given.


def setattr(ov: Overlay, path: bytes, change: AttrChange, fd: int | None = None) -> None:
    """Apply ``change`` to ``path``, copying it up first as the kernel does for any setattr."""
    ov.require_writable()
    res = copy_up(ov, path)
    _, parent_fd, name = ov.top_parent(res)
    with _object_fd(parent_fd, name) as opath:
        st = os.fstat(opath)
        target = fd_path(opath)
        if change.size is not None:
            _truncate(st, target, change.size, fd)
        if change.uid is not None or change.gid is not None:
            uid = -1 if change.uid is None else change.uid
            gid = -1 if change.gid is None else change.gid
            if stat.S_ISLNK(st.st_mode):
                os.chown(name, uid, gid, dir_fd=parent_fd, follow_symlinks=False)
            else:
                os.chown(target, uid, gid)
        if change.mode is not None and not stat.S_ISLNK(st.st_mode):
            os.chmod(target, stat.S_IMODE(change.mode))
        if change.atime_ns is not None or change.mtime_ns is not None:
            _set_times(st, name, parent_fd, target, change)
    ov.invalidate(path)


def _truncate(st: os.stat_result, target: bytes, size: int, fd: int | None) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    if fd is not None:
        os.ftruncate(fd, size)
    else:
        os.truncate(target, size)


def _set_times(
    st: os.stat_result, name: bytes, parent_fd: int | None, target: bytes, change: AttrChange
) -> None:
    atime = st.st_atime_ns if change.atime_ns is None else change.atime_ns
    mtime = st.st_mtime_ns if change.mtime_ns is None else change.mtime_ns
    if stat.S_ISLNK(st.st_mode):
        os.utime(name, ns=(atime, mtime), dir_fd=parent_fd, follow_symlinks=False)
    else:
        os.utime(target, ns=(atime, mtime))


@contextlib.contextmanager
def _object_fd(parent_fd: int, name: bytes) -> Iterator[int]:
    """An O_PATH fd on the object itself (never a symlink's target); ``name`` empty for
    the directory ``parent_fd`` itself."""
    fd = os.open(name or b".", O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    try:
        yield fd
    finally:
        os.close(fd)
