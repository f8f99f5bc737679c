"""Opening files: which real file an open reaches, and when it forces a copy-up.

Opening a lower regular file for writing, or with O_TRUNC, copies it up first (the
kernel's rule); read-only opens go to the topmost copy, with no atime update on lower
layers. The returned :class:`OpenFile` remembers whether it reads a lower file, so the
FUSE glue can move it to the upper copy once someone copies the file up, as the kernel
does for read(2) (but not for an existing mmap).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import time

from pyoverlay.copy_up import copy_up
from pyoverlay.namei import Resolved
from pyoverlay.overlay import Overlay
from pyoverlay.util import fd_path

#: Flags the backing open keeps; creation and truncation were dealt with already.
_KEEP = os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_DIRECT | os.O_SYNC | os.O_DSYNC


@dataclasses.dataclass(slots=True)
class OpenFile:
    fd: int
    path: bytes
    flags: int
    lower: bool
    #: A lower file with several names: one FUSE inode stands for all of them.
    shared: bool = False


def needs_copy_up(flags: int) -> bool:
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)


def open_file(ov: Overlay, path: bytes, flags: int) -> OpenFile:
    """Open the merged regular file ``path`` with open(2) ``flags``."""
    res = ov.lookup(path)
    if res.is_dir:
        raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if needs_copy_up(flags):
        ov.require_writable()
        res = copy_up(ov, path)
    return open_resolved(ov, res, flags)


def open_resolved(ov: Overlay, res: Resolved, flags: int) -> OpenFile:
    layer, parent_fd, name = ov.top_parent(res)
    backing = flags & _KEEP
    fd = ov.open_in_layer(layer, parent_fd, name, backing)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), res.path)
    if flags & os.O_TRUNC and layer.upper:
        _truncate_on_open(fd, backing)
    lower = not layer.upper
    return OpenFile(fd, res.path, flags, lower, shared=lower and st.st_nlink > 1)


def _truncate_on_open(fd: int, backing: int) -> None:
    """What open(2) does for O_TRUNC: size 0 and a new mtime, even for an empty file.

    Linux also truncates for O_RDONLY | O_TRUNC; ftruncate(2) refuses a read-only fd,
    so that case goes through the fd's /proc path.
    """
    if backing & os.O_ACCMODE == os.O_RDONLY:
        os.truncate(fd_path(fd), 0)
    else:
        os.ftruncate(fd, 0)
    now = time.time_ns()
    os.utime(fd, ns=(os.fstat(fd).st_atime_ns, now))


def reopen_upper(ov: Overlay, handle: OpenFile) -> None:
    """Point a read-only handle at the upper copy after the file was copied up."""
    res = ov.resolve(handle.path)
    if res is None or not res.in_upper:
        return
    new = open_resolved(ov, res, handle.flags & ~os.O_TRUNC)
    os.close(handle.fd)
    handle.fd, handle.lower = new.fd, False
