"""Copy-up: bringing a lower object into the upper layer, the kernel's way.

The story, as in the kernel's ``copy_up.c``: the parent chain is copied up first
(directories without their contents); the object is built in the work directory
(:meth:`CopyUp.start`), its data copied with a reflink or in-kernel copy that keeps
holes and then fsynced (:meth:`CopyUp.copy_data`, safe to run in a worker thread), its
owner, xattrs, mode and times set, and one rename publishes it (:meth:`CopyUp.finish`).
A crash at any point leaves either nothing or the complete object in upper; leftovers
stay in the work directory, which is emptied at the next mount.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import TYPE_CHECKING

from pyoverlay.layers import is_private_xattr, split
from pyoverlay.namei import Resolved
from pyoverlay.util import FICLONE, RENAME_NOREPLACE, at_path, renameat2

if TYPE_CHECKING:
    from pyoverlay.overlay import Overlay

_CHUNK = 8 << 20


def copy_up(ov: Overlay, path: bytes) -> Resolved:
    """Make sure ``path`` exists in upper and return its new resolution."""
    res = ov.resolve(path)
    if res is None:
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    if res.in_upper:
        return res
    copy_up_parents(ov, path)
    job = CopyUp(ov, res)
    job.start()
    try:
        job.copy_data()
    except BaseException:
        job.abort()
        raise
    return job.finish()


def copy_up_parents(ov: Overlay, path: bytes) -> None:
    """Copy up every directory above ``path`` that is not in upper yet."""
    parent, _ = split(path)
    if parent:
        copy_up(ov, parent)


class CopyUp:
    """One object's copy-up, in three steps so the data copy can leave the event loop."""

    def __init__(self, ov: Overlay, res: Resolved):
        self.ov = ov
        self.res = res
        self.src_fd: int | None = None
        self.dst_fd: int | None = None
        self.temp = ov.temp_name()
        layer, relpath = res.top
        self.src_dir, self.name = split(relpath)
        self.src_layer = layer
        parent_fd = ov.stack.dir_fd(layer, self.src_dir)
        self.st = os.stat(self.name, dir_fd=parent_fd, follow_symlinks=False)

    @property
    def size(self) -> int:
        return self.st.st_size if stat.S_ISREG(self.st.st_mode) else 0

    def start(self) -> None:
        """Create the object in the work directory (data not copied yet)."""
        st, work = self.st, self.ov.work_fd
        parent_fd = self.ov.stack.dir_fd(self.src_layer, self.src_dir)
        mode = stat.S_IFMT(st.st_mode)
        if stat.S_ISREG(mode):
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            self.src_fd = self.ov.open_in_layer(self.src_layer, parent_fd, self.name, flags)
            self.dst_fd = os.open(
                self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=work
            )
        elif stat.S_ISDIR(mode):
            os.mkdir(self.temp, 0o700, dir_fd=work)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(self.name, dir_fd=parent_fd), self.temp, dir_fd=work)
        else:
            os.mknod(self.temp, mode | 0o600, st.st_rdev, dir_fd=work)

    def copy_data(self) -> None:
        """Copy the file data and fsync it; touches only the two fds (thread-safe)."""
        if self.src_fd is None or self.dst_fd is None:
            return
        copy_file_data(self.src_fd, self.dst_fd, self.size)
        os.fsync(self.dst_fd)

    def finish(self) -> Resolved:
        """Set metadata, publish the object into upper and return the new resolution."""
        try:
            self._copy_metadata()
            path = self.res.path
            parent_path, name = split(path)
            upper_parent = self.ov.upper_dir_fd(parent_path)
            parent_st = os.fstat(upper_parent)
            renameat2(self.ov.work_fd, self.temp, upper_parent, name, RENAME_NOREPLACE)
            # A copy-up is not a change of the parent: the kernel puts its times back.
            os.utime(upper_parent, ns=(parent_st.st_atime_ns, parent_st.st_mtime_ns))
        except BaseException:
            self.abort()
            raise
        self._close()
        new_st = os.stat(name, dir_fd=upper_parent, follow_symlinks=False)
        if stat.S_ISDIR(self.st.st_mode) or self.st.st_nlink == 1:
            # A copied-up name of a multiply-linked lower file is a new inode: the other
            # names still show the lower one, so it must not share their number.
            self.ov.numbers.keep(new_st, self.ov.numbers.number(self.st))
        self.ov.invalidate(path)
        self.ov.copied_up.append(path)
        res = self.ov.resolve(path)
        assert res is not None and res.in_upper
        return res

    def abort(self) -> None:
        """Remove the half-built object from the work directory."""
        self._close()
        try:
            if stat.S_ISDIR(self.st.st_mode):
                os.rmdir(self.temp, dir_fd=self.ov.work_fd)
            else:
                os.unlink(self.temp, dir_fd=self.ov.work_fd)
        except FileNotFoundError:
            pass

    def _close(self) -> None:
        for fd in (self.src_fd, self.dst_fd):
            if fd is not None:
                os.close(fd)
        self.src_fd = self.dst_fd = None

    def _copy_metadata(self) -> None:
        # chown first: it clears setuid bits and security.capability, which the mode and
        # xattrs that follow put back.
        st, work, temp = self.st, self.ov.work_fd, self.temp
        os.chown(temp, st.st_uid, st.st_gid, dir_fd=work, follow_symlinks=False)
        parent_fd = self.ov.stack.dir_fd(self.src_layer, self.src_dir)
        # Escaped names (a user's trusted.overlay.X) are user data: copied like any other.
        keep = (self.ov.xattr_prefix + "overlay.",)
        copy_xattrs(at_path(parent_fd, self.name), at_path(work, temp), keep)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(temp, stat.S_IMODE(st.st_mode), dir_fd=work)
        os.utime(temp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=work, follow_symlinks=False)


def copy_xattrs(src: bytes, dst: bytes, keep: tuple[str, ...] = ()) -> None:
    """Copy every xattr we can read, except the overlay's private ones (but those
    starting with a prefix in ``keep``)."""
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for name in names:
        if is_private_xattr(name) and not name.startswith(keep):
            continue
        try:
            value = os.getxattr(src, name, follow_symlinks=False)
            os.setxattr(dst, name, value, follow_symlinks=False)
        except OSError as exc:
            # The upper filesystem may not support a namespace (ACLs, say): the kernel
            # skips those too.
            if exc.errno not in (errno.ENOTSUP, errno.ENODATA):
                raise


def copy_file_data(src: int, dst: int, size: int) -> None:
    """Copy ``size`` bytes: a reflink if possible, else in-kernel copies that keep holes."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return
    except OSError:
        pass
    offset = 0
    while offset < size:
        try:
            data = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # only a hole is left
            data = offset
        hole = min(os.lseek(src, data, os.SEEK_HOLE), size) if data < size else size
        _copy_range(src, dst, data, hole)
        offset = hole
    os.ftruncate(dst, size)


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        count = min(_CHUNK, end - pos)
        try:
            done = os.copy_file_range(src, dst, count, pos, pos)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            done = _copy_by_read(src, dst, pos, count)
        if done == 0:
            break  # the source shrank under us
        pos += done


def _copy_by_read(src: int, dst: int, pos: int, count: int) -> int:
    data = os.pread(src, count, pos)
    if data:
        os.pwrite(dst, data, pos)
    return len(data)
