"""Layers and their on-disk markers: whiteouts, opaque directories, private xattrs.

Every rule about what a whiteout or an opaque directory looks like lives here, named
once (`is_whiteout`, `read_dir_markers`) and called everywhere. A :class:`LayerStack`
holds one directory fd per layer root and reaches directories inside a layer only
through ``openat(O_NOFOLLOW | O_DIRECTORY)`` component by component, so a symlink or a
``..`` inside a layer can never lead the daemon out of it.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import os
import stat

from pyoverlay.util import O_NOATIME

WHITEOUT_PREFIX = b".wh."
OPAQUE_FILE = b".wh..wh..opq"
#: xattrs that mark a directory opaque (value "y"); "x" on the overlay ones means the
#: directory holds xattr whiteouts, not that it is opaque.
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")
WHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")
REDIRECT_XATTRS = ("trusted.overlay.redirect", "user.overlay.redirect")
#: Names the overlay keeps for itself: never listed, read, set or copied up.
PRIVATE_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")
_MARKER_XATTRS = frozenset(OPAQUE_XATTRS + REDIRECT_XATTRS)

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Errors that mean "this path is not a directory inside this layer".
NOT_A_DIR = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def is_private_xattr(name: str) -> bool:
    return name.startswith(PRIVATE_XATTR_PREFIXES)


def is_whiteout(st: os.stat_result) -> bool:
    """A character device 0/0: the kernel's and containerd's whiteout."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_whiteout_name(name: bytes) -> bool:
    """``.wh.NAME`` files (OCI, fuse-overlayfs) are markers, never shown."""
    return name.startswith(WHITEOUT_PREFIX)


@dataclasses.dataclass(frozen=True, slots=True)
class DirMarkers:
    opaque: bool = False
    #: The directory holds zero-size files with an overlay.whiteout xattr (opaque="x").
    xattr_whiteouts: bool = False
    redirect: bytes | None = None


NO_MARKERS = DirMarkers()


def read_dir_markers(dirfd: int) -> DirMarkers:
    """Read the opaque and redirect markers of the directory open as ``dirfd``."""
    names = _MARKER_XATTRS.intersection(os.listxattr(dirfd))
    opaque = xwhiteouts = False
    redirect = None
    for name in names:
        value = _getxattr(dirfd, name)
        if value is None:
            continue
        if name in REDIRECT_XATTRS:
            redirect = value
        elif value == b"y":
            opaque = True
        elif value == b"x" and not name.startswith("user.fuseoverlayfs."):
            xwhiteouts = True
    if not opaque and _exists(dirfd, OPAQUE_FILE):
        opaque = True
    if not (opaque or xwhiteouts or redirect):
        return NO_MARKERS
    return DirMarkers(opaque, xwhiteouts, redirect)


def is_xattr_whiteout(dirfd: int, name: bytes, st: os.stat_result) -> bool:
    """A zero-size regular file carrying overlay.whiteout, inside an opaque="x" dir."""
    if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
        return False
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dirfd)
    except OSError:
        return False
    try:
        return any(_getxattr(fd, attr) is not None for attr in WHITEOUT_XATTRS)
    finally:
        os.close(fd)


def has_whiteout_file(dirfd: int, name: bytes) -> bool:
    return _exists(dirfd, WHITEOUT_PREFIX + name)


def _exists(dirfd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except OSError:
        return False
    return True


def _getxattr(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return None
        raise


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def split(path: bytes) -> tuple[bytes, bytes]:
    parent, _, name = path.rpartition(b"/")
    return parent, name


@dataclasses.dataclass(eq=False)
class Layer:
    """One layer directory: the upper one (writable) or a lower one (never written)."""

    index: int
    path: str
    fd: int
    upper: bool
    dev: int

    def __repr__(self) -> str:
        return f"Layer({self.index}, {self.path!r}, upper={self.upper})"


class LayerStack:
    """The layers of one mount, top first, with a bounded cache of directory fds."""

    def __init__(self, lowerdirs: list[str], upperdir: str | None, *, cache_size: int = 512):
        self.layers: list[Layer] = []
        self._noatime = O_NOATIME if os.geteuid() == 0 else 0
        if upperdir is not None:
            self._add(upperdir, upper=True)
        for path in lowerdirs:
            self._add(path, upper=False)
        self.upper: Layer | None = self.layers[0] if upperdir is not None else None
        self.lowers: list[Layer] = [layer for layer in self.layers if not layer.upper]
        self._dirs: collections.OrderedDict[tuple[int, bytes], int] = collections.OrderedDict()
        self._cache_size = max(cache_size, 16)

    def _add(self, path: str, *, upper: bool) -> None:
        # The layer path itself comes from whoever mounts, so a symlink there is followed;
        # only what lies inside a layer is untrusted.
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            fd = os.open(path, flags | (0 if upper else self._noatime))
        except PermissionError:
            fd = os.open(path, flags)
        self.layers.append(Layer(len(self.layers), path, fd, upper, os.fstat(fd).st_dev))

    def open_flags(self, layer: Layer) -> int:
        """Extra flags for opening objects in ``layer`` (lowers get no atime updates)."""
        return 0 if layer.upper else self._noatime

    def dir_fd(self, layer: Layer, relpath: bytes) -> int:
        """An fd for directory ``relpath`` inside ``layer``, opened without following links.

        The fd belongs to the cache: use it before the next call to this method and
        never close it. Raises OSError (ENOENT, ENOTDIR, ELOOP) if ``relpath`` is not a
        directory reached through directories inside the layer.
        """
        if not relpath:
            return layer.fd
        key = (layer.index, relpath)
        fd = self._dirs.get(key)
        if fd is not None:
            self._dirs.move_to_end(key)
            return fd
        parent, name = split(relpath)
        parent_fd = self.dir_fd(layer, parent)
        flags = DIR_FLAGS | self.open_flags(layer)
        try:
            fd = os.open(name, flags, dir_fd=parent_fd)
        except PermissionError:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)  # O_NOATIME needs ownership
        self._dirs[key] = fd
        if len(self._dirs) > self._cache_size:
            _, old = self._dirs.popitem(last=False)
            os.close(old)
        return fd

    def try_dir_fd(self, layer: Layer, relpath: bytes) -> int | None:
        try:
            return self.dir_fd(layer, relpath)
        except OSError as exc:
            if exc.errno in NOT_A_DIR:
                return None
            raise

    def drop_dir(self, layer: Layer, relpath: bytes) -> None:
        """Close the cached fd of exactly ``relpath`` (if any)."""
        fd = self._dirs.pop((layer.index, relpath), None)
        if fd is not None:
            os.close(fd)

    def forget_dirs(self, layer: Layer, relpath: bytes) -> None:
        """Drop cached fds of ``relpath`` and everything below it (it moved or went)."""
        prefix = relpath + b"/"
        stale = [
            key
            for key in self._dirs
            if key[0] == layer.index and (key[1] == relpath or key[1].startswith(prefix))
        ]
        for key in stale:
            os.close(self._dirs.pop(key))

    def drop_all_dirs(self) -> None:
        """Close every cached directory fd (their directories may have been replaced)."""
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def cached_dir_fds(self) -> int:
        return len(self._dirs)

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        for layer in self.layers:
            os.close(layer.fd)
        self.layers.clear()
