"""The overlay model: one mounted overlay, every operation addressed by merged path.

:class:`Overlay` owns the layer stack, the work directory, inode numbering and the
cache of lookups. It is plain Python: tests drive it without FUSE, and the FUSE glue
(``fuse_ops.py``) only turns requests into calls on it. The rules themselves live in
the modules named after the kernel's files (``namei``, ``readdir``, ``copy_up``,
``dir``, ``inode``, ``file``, ``xattrs``).
"""

from __future__ import annotations

import collections
import errno
import itertools
import os
import shutil

from pyoverlay import namei, readdir
from pyoverlay.inode import Attributes, InodeNumbers
from pyoverlay.layers import DIR_FLAGS, Layer, LayerStack, split
from pyoverlay.namei import Resolved
from pyoverlay.params import MountOptions

#: The kernel keeps its temporary objects in WORK/work; so do we, so that either can
#: mount what the other left behind.
WORK_SUBDIR = "work"


def erofs() -> OSError:
    return OSError(errno.EROFS, os.strerror(errno.EROFS))


def enoent(path: bytes = b"") -> OSError:
    return OSError(errno.ENOENT, os.strerror(errno.ENOENT), path or None)


class Overlay:
    """A merged view of ``opts.lowerdirs`` (and ``opts.upperdir`` when writable)."""

    def __init__(self, opts: MountOptions, *, cache_size: int = 65536):
        self.opts = opts
        upper = opts.upperdir if opts.upperdir and not opts.read_only else None
        lowers = list(opts.lowerdirs)
        if opts.upperdir and opts.read_only:
            # `ro` with an upper dir shows it as the top layer, written like no lower is.
            lowers.insert(0, opts.upperdir)
        self.stack = LayerStack(lowers, upper)
        self.writable = upper is not None
        self.work_fd = -1
        if self.writable:
            assert opts.workdir is not None
            self.work_fd = _open_work(opts.workdir)
        self.numbers = InodeNumbers([layer.dev for layer in self.stack.layers])
        self._cache: collections.OrderedDict[bytes, Resolved] = collections.OrderedDict()
        self._cache_size = cache_size if opts.cache != "none" else 0
        self._listings: collections.OrderedDict[bytes, list[bytes]] = collections.OrderedDict()
        #: Listings hold many names each, so fewer of them are kept.
        self._listing_cache_size = self._cache_size // 64
        self._temp_counter = itertools.count()
        #: Paths copied up since the FUSE glue last looked: their attributes (a
        #: directory's link count, say) may differ from what the kernel cached.
        self.copied_up: list[bytes] = []
        self.xattr_prefix = opts.xattr_prefix()

    # -- lookup -------------------------------------------------------------------------

    def resolve(self, path: bytes) -> Resolved | None:
        """Where the merged object at ``path`` lives, or None if nothing is visible there."""
        cached = self._cache.get(path)
        if cached is not None:
            self._cache.move_to_end(path)
            return cached
        if not path:
            res: Resolved | None = namei.root(self.stack)
        else:
            parent_path, name = split(path)
            parent = self.resolve(parent_path)
            if parent is None or not parent.is_dir:
                return None
            res = namei.lookup_child(self.stack, parent, name)
        if res is not None and self._cache_size:
            self._cache[path] = res
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return res

    def lookup(self, path: bytes) -> Resolved:
        """Like :meth:`resolve`, but ENOENT when nothing is there."""
        res = self.resolve(path)
        if res is None:
            raise enoent(path)
        return res

    def invalidate(self, path: bytes, *, subtree: bool = False) -> None:
        """Forget cached lookups of ``path`` (and below it) after we changed it, and the
        listing of its parent, which may have changed with it."""
        self._cache.pop(path, None)
        self._listings.pop(path, None)
        if path:
            self._listings.pop(split(path)[0], None)
        if subtree:
            prefix = path + b"/"
            for cache in (self._cache, self._listings):
                for key in [k for k in cache if k.startswith(prefix)]:
                    del cache[key]

    def listing(self, path: bytes) -> list[bytes]:
        """Visible names in merged directory ``path``, cached until we change it.

        The kernel does not cache directory listings of a FUSE mount, so without this
        every warm ``find`` or ``tar`` would merge the layers again.
        """
        names = self._listings.get(path)
        if names is not None:
            self._listings.move_to_end(path)
            return names
        names = readdir.merged_names(self.stack, self.lookup(path))
        if self._listing_cache_size:
            self._listings[path] = names
            if len(self._listings) > self._listing_cache_size:
                self._listings.popitem(last=False)
        return names

    def compact(self) -> None:
        """Rebuild the lookup caches after most entries went (dicts never shrink)."""
        self._cache = collections.OrderedDict(self._cache)
        self._listings = collections.OrderedDict(self._listings)

    def forget(self, path: bytes) -> None:
        """The kernel holds ``path`` no more: drop its lookup and its cached directory fds."""
        res = self._cache.pop(path, None)
        self._listings.pop(path, None)
        if res is None or res.is_dir:
            # Without the lookup at hand, drop the fds at the usual (unredirected) places.
            places = res.layers if res is not None else [(lay, path) for lay in self.stack.layers]
            for layer, relpath in places:
                self.stack.drop_dir(layer, relpath)

    # -- attributes ---------------------------------------------------------------------

    def top_parent(self, res: Resolved) -> tuple[Layer, int, bytes]:
        """The topmost copy of ``res`` as (layer, fd of its parent directory, name).

        For the merged root the name is empty and the fd is the layer root's.
        """
        layer, relpath = res.top
        parent, name = split(relpath)
        return layer, self.stack.dir_fd(layer, parent) if name else layer.fd, name

    def stat_of(self, res: Resolved) -> os.stat_result:
        _, parent_fd, name = self.top_parent(res)
        if not name:
            return os.fstat(parent_fd)
        return os.stat(name, dir_fd=parent_fd, follow_symlinks=False)

    def attributes(self, res: Resolved) -> Attributes:
        st = self.stat_of(res)
        # The kernel does not count subdirectories of merged directories; 'find' and
        # friends accept 1 as "unknown".
        nlink = 1 if res.is_merged else st.st_nlink
        return Attributes(self.numbers.number(st), st, nlink)

    # -- helpers for the write path -----------------------------------------------------

    def require_writable(self) -> None:
        if not self.writable:
            raise erofs()

    @property
    def upper(self) -> Layer:
        assert self.stack.upper is not None
        return self.stack.upper

    def upper_dir_fd(self, path: bytes) -> int:
        """fd of the upper copy of merged directory ``path`` (which must exist there)."""
        return self.stack.dir_fd(self.upper, path)

    def temp_name(self) -> bytes:
        return b"#%x.%x" % (os.getpid(), next(self._temp_counter))

    def open_in_layer(self, layer: Layer, dirfd: int, name: bytes, flags: int) -> int:
        """Open ``name`` in a layer directory, never following a symlink, no atime on lowers."""
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        extra = self.stack.open_flags(layer)
        if extra:
            try:
                return os.open(name, flags | extra, dir_fd=dirfd)
            except PermissionError:
                pass  # O_NOATIME is only for the owner; retry without it
        return os.open(name, flags, dir_fd=dirfd)

    def lower_positive(self, parent: Resolved, name: bytes) -> bool:
        """Is ``name`` visible in the lower layers of ``parent``? Then removing it needs a
        whiteout."""
        lowers = [(i, lr) for i, lr in enumerate(parent.layers) if not lr[0].upper]
        if not lowers:
            return False
        below = Resolved(
            parent.path,
            tuple(lr for _, lr in lowers),
            True,
            tuple(parent.markers[i] for i, _ in lowers),
        )
        return namei.lookup_child(self.stack, below, name) is not None

    def close(self) -> None:
        self.stack.close()
        if self.work_fd >= 0:
            os.close(self.work_fd)
            self.work_fd = -1


def _open_work(workdir: str) -> int:
    """Open WORK/work, emptied of whatever an interrupted run left in it."""
    outer = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.mkdir(WORK_SUBDIR, 0o000, dir_fd=outer)
        except FileExistsError:
            _empty_dir(outer, WORK_SUBDIR)
        return os.open(WORK_SUBDIR, DIR_FLAGS, dir_fd=outer)
    finally:
        os.close(outer)


def _empty_dir(parent_fd: int, name: str) -> None:
    fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    try:
        for entry in os.scandir(fd):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.name, dir_fd=fd)
            else:
                os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)
