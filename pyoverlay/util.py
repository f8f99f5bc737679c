"""Thin wrappers for the system calls Python's os module lacks (renameat2, FICLONE).

Also the one place that knows how to name an object by directory fd and name without
following a symlink in its last component.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
FICLONE = 0x40049409
O_NOATIME = getattr(os, "O_NOATIME", 0o1000000)
O_PATH = getattr(os, "O_PATH", 0o10000000)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int = 0) -> None:
    """rename(2) relative to directory fds, with RENAME_* flags."""
    if _renameat2(olddirfd, oldname, newdirfd, newname, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), oldname)


def at_path(dirfd: int, name: bytes) -> bytes:
    """A path naming ``name`` inside the directory open as ``dirfd``.

    /proc/self/fd/N is a magic link to the directory we opened ourselves, so only the
    last component is looked up by name; callers must pass follow_symlinks=False (or
    know the object is not a symlink) so that component is never followed.
    """
    return b"/proc/self/fd/%d/%s" % (dirfd, name)


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps it otherwise)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def fd_path(fd: int) -> bytes:
    """A path for an open fd (also an O_PATH one) that reaches exactly that object."""
    return b"/proc/self/fd/%d" % fd


__all__ = [
    "FICLONE",
    "O_NOATIME",
    "O_PATH",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "RENAME_WHITEOUT",
    "at_path",
    "fd_path",
    "release_memory",
    "renameat2",
]
