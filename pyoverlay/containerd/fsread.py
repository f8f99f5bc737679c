"""Read-only, atime-free access to files under a containerd root.

Every open here uses O_NOATIME where the kernel permits it (we own the file or have
CAP_FOWNER) and O_NOFOLLOW, so layer content, which is untrusted, can never lead us
out of the snapshot through a symlink. Directories are listed through such fds too.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

_NOATIME = getattr(os, "O_NOATIME", 0)


def open_noatime(path: str, flags: int = 0, *, dir_fd: int | None = None) -> int:
    """Open read-only without following a final symlink and without touching atime."""
    flags |= os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, flags | _NOATIME, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno != errno.EPERM or not _NOATIME:
            raise
        return os.open(path, flags, dir_fd=dir_fd)


def is_real_dir(path: str) -> bool:
    """A directory reached without a symlink in its last two components.

    Snapshot ``fs`` dirs and their ``snapshots/<id>`` parents are never symlinks in a
    healthy root; following one would read (or mount) something outside the root.
    """
    try:
        return all(stat.S_ISDIR(os.lstat(p).st_mode) for p in (path, os.path.dirname(path)))
    except OSError:
        return False


def list_dir(path: str) -> list[tuple[str, os.stat_result]]:
    """(name, lstat) of each entry of a directory, listed through an O_NOATIME fd."""
    fd = open_noatime(path, os.O_DIRECTORY)
    try:
        result = []
        for name in os.listdir(fd):
            try:
                result.append((name, os.stat(name, dir_fd=fd, follow_symlinks=False)))
            except FileNotFoundError:
                continue  # removed while we listed
        return result
    finally:
        os.close(fd)


def walk(top: str) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) for everything below ``top``, parents before children.

    Symlinks are reported, never followed; directories on other filesystems (mount
    points) are reported but not entered.
    """
    top_dev = os.lstat(top).st_dev
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            entries = list_dir(os.path.join(top, rel) if rel else top)
        except OSError:
            continue  # vanished, or replaced by a symlink: never followed
        for name, st in sorted(entries):
            child = f"{rel}/{name}" if rel else name
            yield child, st
            if stat.S_ISDIR(st.st_mode) and st.st_dev == top_dev:
                stack.append(child)


def disk_usage(top: str) -> int:
    """Bytes allocated below ``top``, counting each hard-linked inode once."""
    seen: set[int] = set()
    total = os.lstat(top).st_blocks * 512
    for _rel, st in walk(top):
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
        total += st.st_blocks * 512
    return total
