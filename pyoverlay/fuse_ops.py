"""The pyfuse3 glue: FUSE requests in, calls on the :class:`Overlay` model out.

Nothing here decides overlay semantics. It maps FUSE inode numbers to merged paths (the
:class:`NodeTable`), turns ``OSError`` into ``FUSEError``, answers an unexpected
exception with EIO (logged; the daemon keeps serving), and moves big copy-ups to a
worker thread so the mount keeps answering while they run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import itertools
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from pyoverlay import dir as dirops
from pyoverlay import file as fileops
from pyoverlay import inode as inodeops
from pyoverlay import xattrs
from pyoverlay.copy_up import CopyUp, copy_up_parents
from pyoverlay.inode import AttrChange, Attributes
from pyoverlay.layers import join, split
from pyoverlay.namei import Resolved
from pyoverlay.overlay import Overlay
from pyoverlay.util import release_memory

log = logging.getLogger("pyoverlay")

#: Copy-ups of files larger than this run in a worker thread.
THREAD_COPY_UP_BYTES = 1 << 20
#: A FORGET batch this big means the kernel is shrinking its caches.
_TRIM_AFTER_FORGETS = 256
_ROOT = pyfuse3.ROOT_INODE

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def handler(func: F) -> F:
    """Wrap a request handler: errno for OSError, EIO (logged) for anything unexpected."""
    name = func.__name__

    @functools.wraps(func)
    async def wrapper(self: OverlayOperations, *args: Any) -> Any:
        if self.debug:
            log.info("%s%r", name, tuple(a for a in args if not _is_context(a)))
        if not self.keep_cache:
            # cache=none: lower layers may change under us, so reach every directory anew.
            self.ov.stack.drop_all_dirs()
        try:
            try:
                return await func(self, *args)
            finally:
                if self.ov.copied_up:
                    self._refresh_copied_up()
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s%r", name, args[:3])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _is_context(arg: object) -> bool:
    return isinstance(arg, pyfuse3.RequestContext | pyfuse3.ReaddirToken)


@dataclasses.dataclass
class Node:
    """A FUSE inode the kernel knows: its lookup count and the names it was found by."""

    lookups: int = 0
    #: (parent inode, name) pairs, most recently looked up last.
    links: list[tuple[int, bytes]] = dataclasses.field(default_factory=list)


class NodeTable:
    """Inode number -> merged path, following renames and unlinks we carry out."""

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {_ROOT: Node(lookups=1)}
        self.children: dict[tuple[int, bytes], int] = {}
        #: The most nodes held since the tables were last rebuilt.
        self._high = 1

    def path(self, ino: int) -> bytes:
        parts: list[bytes] = []
        seen = 0
        while ino != _ROOT:
            node = self.nodes.get(ino)
            if node is None or not node.links:
                raise pyfuse3.FUSEError(errno.ESTALE)
            ino, name = node.links[-1]
            parts.append(name)
            seen += 1
            if seen > 4096:
                raise pyfuse3.FUSEError(errno.ELOOP)
        return b"/".join(reversed(parts))

    def find(self, path: bytes) -> int | None:
        """The inode the kernel knows for ``path``, if any."""
        ino = _ROOT
        for name in path.split(b"/") if path else ():
            child = self.children.get((ino, name))
            if child is None:
                return None
            ino = child
        return ino

    def remember(self, parent: int, name: bytes, ino: int) -> None:
        """The kernel now holds one more reference to ``ino``, found as ``parent/name``."""
        key = (parent, name)
        old = self.children.get(key)
        if old is not None and old != ino:
            self._drop_link(old, key)
        node = self.nodes.setdefault(ino, Node())
        self._high = max(self._high, len(self.nodes))
        node.lookups += 1
        if key in node.links:
            node.links.remove(key)
        node.links.append(key)
        self.children[key] = ino

    def forget(self, ino: int, count: int) -> bytes | None:
        """Drop ``count`` references; the path of a node the kernel no longer holds."""
        node = self.nodes.get(ino)
        if node is None or ino == _ROOT:
            return None
        node.lookups -= count
        if node.lookups > 0:
            return None
        try:
            path: bytes | None = self.path(ino)
        except pyfuse3.FUSEError:
            path = None  # its parent went first
        for key in node.links:
            if self.children.get(key) == ino:
                del self.children[key]
        del self.nodes[ino]
        return path

    def compact(self) -> bool:
        """Rebuild the tables once most nodes are gone (dicts never shrink by themselves);
        True if it did."""
        if len(self.nodes) * 4 >= self._high:
            return False
        self.nodes = dict(self.nodes)
        self.children = dict(self.children)
        self._high = len(self.nodes)
        return True

    def removed(self, parent: int, name: bytes) -> None:
        key = (parent, name)
        ino = self.children.pop(key, None)
        if ino is not None:
            self._drop_link(ino, key)

    def moved(self, old: tuple[int, bytes], new: tuple[int, bytes], *, exchange: bool) -> None:
        moved_ino = self.children.pop(old, None)
        other_ino = self.children.pop(new, None)
        if other_ino is not None:
            self._drop_link(other_ino, new)
            if exchange:
                self._add_link(other_ino, old)
        if moved_ino is not None:
            self._drop_link(moved_ino, old)
            self._add_link(moved_ino, new)

    def _add_link(self, ino: int, key: tuple[int, bytes]) -> None:
        node = self.nodes.get(ino)
        if node is not None:
            node.links.append(key)
            self.children[key] = ino

    def _drop_link(self, ino: int, key: tuple[int, bytes]) -> None:
        node = self.nodes.get(ino)
        if node is not None and key in node.links:
            node.links.remove(key)


@dataclasses.dataclass
class DirHandle:
    path: bytes
    ino: int
    names: list[bytes] | None = None


class OverlayOperations(pyfuse3.Operations):
    """pyfuse3 request handlers for one :class:`Overlay`."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, ov: Overlay, *, debug: bool = False):
        super().__init__()
        self.ov = ov
        self.debug = debug
        self.nodes = NodeTable()
        self.files: dict[int, fileops.OpenFile] = {}
        self.dirs: dict[int, DirHandle] = {}
        self._handles = itertools.count(1)
        self._copy_locks: dict[bytes, trio.Lock] = {}
        #: Tests prove that a surprise in a handler becomes EIO and the daemon lives on:
        #: a lookup of this name raises RuntimeError.
        self._fault_name = os.environ.get("PYOVERLAY_INJECT_FAULT", "").encode() or None
        caching = ov.opts.cache != "none"
        self.timeout = ov.opts.timeout if caching else 0.0
        self.keep_cache = caching

    # -- helpers ------------------------------------------------------------------------

    def _entry(self, res: Resolved, attrs: Attributes) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        st = attrs.st
        entry.st_ino = attrs.ino
        entry.generation = self.ov.numbers.generation(attrs.ino)
        timeout = self.timeout
        if not res.is_dir and not res.in_upper and st.st_nlink > 1:
            # FUSE names only the inode when a file is opened; a fresh lookup each time
            # tells us which name of a multiply-linked lower file to copy up.
            timeout = 0.0
        entry.entry_timeout = entry.attr_timeout = timeout
        entry.st_mode = st.st_mode
        entry.st_nlink = attrs.nlink
        entry.st_uid = st.st_uid
        entry.st_gid = st.st_gid
        entry.st_rdev = st.st_rdev
        entry.st_size = st.st_size
        entry.st_blksize = st.st_blksize
        entry.st_blocks = st.st_blocks
        entry.st_atime_ns = st.st_atime_ns
        entry.st_mtime_ns = st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        return entry

    def _attrs_of(self, path: bytes) -> tuple[Resolved, pyfuse3.EntryAttributes]:
        res = self.ov.lookup(path)
        return res, self._entry(res, self.ov.attributes(res))

    def _child(self, parent: int, name: bytes) -> bytes:
        if name in (b".", b"..") or b"/" in name or not name:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return join(self.nodes.path(parent), name)

    def _found(self, parent: int, name: bytes, path: bytes) -> pyfuse3.EntryAttributes:
        _, entry = self._attrs_of(path)
        self.nodes.remember(parent, name, entry.st_ino)
        return entry

    async def _copy_up(self, path: bytes) -> Resolved:
        """Copy ``path`` up, running a big data copy in a worker thread."""
        res = self.ov.lookup(path)
        if res.in_upper:
            return res
        self.ov.require_writable()
        lock = self._copy_locks.setdefault(path, trio.Lock())
        try:
            async with lock:
                res = self.ov.lookup(path)
                if res.in_upper:
                    return res
                copy_up_parents(self.ov, path)
                job = CopyUp(self.ov, self.ov.lookup(path))
                job.start()
                try:
                    if job.size > THREAD_COPY_UP_BYTES:
                        await trio.to_thread.run_sync(job.copy_data)
                    else:
                        job.copy_data()
                except BaseException:
                    job.abort()
                    raise
                return job.finish()
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._copy_locks.pop(path, None)

    async def _settle(self, *paths: bytes) -> None:
        """Wait for copy-ups of ``paths`` in progress before changing their names."""
        for path in paths:
            lock = self._copy_locks.get(path)
            if lock is not None:
                async with lock:
                    pass

    def _refresh_copied_up(self) -> None:
        """Tell the kernel to drop cached attributes of objects we just copied up."""
        paths, self.ov.copied_up = self.ov.copied_up, []
        for path in paths:
            ino = self.nodes.find(path)
            if ino is not None:
                with contextlib.suppress(OSError):
                    pyfuse3.invalidate_inode(ino, attr_only=True)

    # -- lookup and attributes ----------------------------------------------------------

    @handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name == self._fault_name:
            raise RuntimeError(f"fault injected by PYOVERLAY_INJECT_FAULT for {name!r}")
        path = self._child(parent_inode, name)
        res = self.ov.resolve(path)
        if res is None:
            if self.timeout == 0:
                raise pyfuse3.FUSEError(errno.ENOENT)
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = self.timeout
            return negative
        entry = self._entry(res, self.ov.attributes(res))
        self.nodes.remember(parent_inode, name, entry.st_ino)
        return entry

    @handler
    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            path = self.nodes.forget(ino, count)
            if path is not None:
                self.ov.forget(path)
            if ino not in self.nodes.nodes:
                self.ov.numbers.forgotten(ino)
        if len(inode_list) >= _TRIM_AFTER_FORGETS:
            # The kernel shrank its caches: shrink our tables and give the memory back.
            if self.nodes.compact():
                self.ov.compact()
            release_memory()

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs_of(self.nodes.path(inode))[1]

    @handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        path = self.nodes.path(inode)
        change = AttrChange(
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        await self._copy_up(path)
        handle = self.files.get(fh) if fh is not None else None
        fd = handle.fd if handle is not None and not handle.lower else None
        inodeops.setattr(self.ov, path, change, fd)
        return self._attrs_of(path)[1]

    @handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        res = self.ov.lookup(self.nodes.path(inode))
        _, parent_fd, name = self.ov.top_parent(res)
        return os.readlink(name, dir_fd=parent_fd)

    @handler
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # default_permissions makes the kernel check modes itself; this only runs
        # without it, where the daemon's own rights decide.
        self.ov.lookup(self.nodes.path(inode))
        return True

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        vfs = os.statvfs(self.ov.stack.layers[0].fd)
        data = pyfuse3.StatvfsData()
        for field in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(data, field, getattr(vfs, field))
        return data

    # -- directories ----------------------------------------------------------------------

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self.nodes.path(inode)
        if not self.ov.lookup(path).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = next(self._handles)
        self.dirs[fh] = DirHandle(path, inode)
        return fh

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.dirs[fh]
        if start_id == 0 or handle.names is None:
            # The listing is built once per handle (and again on rewind), so offsets
            # stay valid however many calls the kernel splits the reading into.
            handle.names = [b".", b"..", *self.ov.listing(handle.path)]
        names = handle.names
        for index in range(start_id, len(names)):
            name = names[index]
            entry = self._dirent(handle, name)
            if entry is None:
                continue
            if not pyfuse3.readdir_reply(token, name, entry, index + 1):
                break
            if name not in (b".", b".."):  # the kernel takes no reference for these
                self.nodes.remember(handle.ino, name, entry.st_ino)

    def _dirent(self, handle: DirHandle, name: bytes) -> pyfuse3.EntryAttributes | None:
        if name == b".":
            path = handle.path
        elif name == b"..":
            path = split(handle.path)[0]
        else:
            path = join(handle.path, name)
        res = self.ov.resolve(path)
        if res is None:
            return None  # removed since the listing was made
        return self._entry(res, self.ov.attributes(res))

    @handler
    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    @handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        handle = self.dirs[fh]
        res = self.ov.lookup(handle.path)
        if res.in_upper:
            os.fsync(self.ov.upper_dir_fd(handle.path))

    @handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        dirops.create(self.ov, path, stat.S_IFDIR | stat.S_IMODE(mode), _caller(ctx))
        return self._found(parent_inode, name, path)

    @handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        dirops.create(self.ov, path, mode, _caller(ctx), rdev=rdev)
        return self._found(parent_inode, name, path)

    @handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        dirops.create(self.ov, path, stat.S_IFLNK | 0o777, _caller(ctx), target=target)
        return self._found(parent_inode, name, path)

    @handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self.nodes.path(inode)
        new_path = self._child(new_parent_inode, new_name)
        if self.ov.resolve(new_path) is not None:
            raise pyfuse3.FUSEError(errno.EEXIST)
        if not self.ov.lookup(path).is_dir:
            await self._copy_up(path)
        dirops.link(self.ov, path, new_path)
        return self._found(new_parent_inode, new_name, new_path)

    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        await self._settle(path)
        dirops.unlink(self.ov, path)
        self.nodes.removed(parent_inode, name)

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        dirops.rmdir(self.ov, path)
        self.nodes.removed(parent_inode, name)

    @handler
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        await self._settle(old, new)
        checked = dirops.check_rename(self.ov, old, new, flags)
        if checked is not None and not checked[0].is_dir:
            await self._copy_up(old)
        dirops.rename(self.ov, old, new, flags)
        self.nodes.moved(
            (parent_inode_old, name_old),
            (parent_inode_new, name_new),
            exchange=bool(flags & pyfuse3.RENAME_EXCHANGE),
        )

    # -- files ----------------------------------------------------------------------------

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        path = self.nodes.path(inode)
        shared = False
        if fileops.needs_copy_up(flags):
            # Whether the lower file had other names must be known before copy-up.
            res = self.ov.lookup(path)
            shared = not res.in_upper and self.ov.stat_of(res).st_nlink > 1
            await self._copy_up(path)
        handle = fileops.open_file(self.ov, path, flags)
        if not (shared or handle.shared):
            return self._file_info(handle)
        # One FUSE inode stands for every name of a multiply-linked lower file, where
        # the kernel (index=off) has one inode per name: data written through one name
        # must not reach the others through the page cache.
        info = self._file_info(handle)
        info.keep_cache = False
        info.direct_io = fileops.needs_copy_up(flags)
        return info

    @handler
    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        mode = stat.S_IFREG | stat.S_IMODE(mode)
        _, fd = dirops.create(self.ov, path, mode, _caller(ctx), open_flags=flags)
        assert fd is not None
        handle = fileops.OpenFile(fd, path, flags, lower=False)
        return self._file_info(handle), self._found(parent_inode, name, path)

    def _file_info(self, handle: fileops.OpenFile) -> pyfuse3.FileInfo:
        fh = next(self._handles)
        self.files[fh] = handle
        return pyfuse3.FileInfo(fh=fh, keep_cache=self.keep_cache)

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.files[fh]
        if handle.lower:
            res = self.ov.resolve(handle.path)
            if res is not None and res.in_upper:
                fileops.reopen_upper(self.ov, handle)
        return os.pread(handle.fd, size, off)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(self.files[fh].fd, buf, off)

    @handler
    async def flush(self, fh: int) -> None:
        # Writes reach the backing fd at once and locks are the kernel's own, so flush
        # has nothing to do. ENOSYS tells the kernel to stop sending it: close(2) no
        # longer waits for a round trip to the daemon.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @handler
    async def release(self, fh: int) -> None:
        handle = self.files.pop(fh, None)
        if handle is not None:
            os.close(handle.fd)

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        fd = self.files[fh].fd
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)

    # -- xattrs ---------------------------------------------------------------------------

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return xattrs.getxattr(self.ov, self.nodes.path(inode), os.fsdecode(name))

    @handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        names = xattrs.listxattr(self.ov, self.nodes.path(inode), privileged=ctx.uid == 0)
        return [os.fsencode(n) for n in names]

    @handler
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        path = self.nodes.path(inode)
        xattrs.check_settable(self.ov, os.fsdecode(name))
        await self._copy_up(path)
        xattrs.setxattr(self.ov, path, os.fsdecode(name), value)

    @handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self.nodes.path(inode)
        xattrs.removexattr(self.ov, path, os.fsdecode(name))


def _caller(ctx: pyfuse3.RequestContext) -> dirops.Caller:
    return dirops.Caller(ctx.uid, ctx.gid, ctx.pid)
