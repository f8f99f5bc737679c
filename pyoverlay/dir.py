"""Namespace operations: create, mknod, mkdir, symlink, link, unlink, rmdir, rename.

As in the kernel's ``dir.c``: new objects are built in the work directory with their
final owner and mode and published by one rename, so they appear whole or not at all.
Removing something a lower layer also has leaves a whiteout (char 0/0); a directory made
where a whiteout was is opaque; a directory that exists in a lower layer moves only with
``redirect_dir=on`` (EXDEV otherwise, which tools like ``mv`` handle by copying).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import stat

from pyoverlay import readdir
from pyoverlay.copy_up import copy_up
from pyoverlay.layers import has_whiteout_file, is_whiteout, is_xattr_whiteout, join, split
from pyoverlay.namei import Resolved
from pyoverlay.overlay import Overlay
from pyoverlay.util import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, at_path, renameat2


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """Who asked: new objects belong to this uid/gid."""

    uid: int = 0
    gid: int = 0
    pid: int = 0


ROOT = Caller()


def _error(code: int, path: bytes | None = None) -> OSError:
    return OSError(code, os.strerror(code), path)


# -- creating ---------------------------------------------------------------------------


def create(
    ov: Overlay,
    path: bytes,
    mode: int,
    caller: Caller = ROOT,
    *,
    rdev: int = 0,
    target: bytes | None = None,
    open_flags: int | None = None,
) -> tuple[Resolved, int | None]:
    """Create the object ``path`` (type in ``mode``); for a regular file with
    ``open_flags``, also return an fd open on it."""
    ov.require_writable()
    parent_path, name = split(path)
    parent = ov.lookup(parent_path)
    if not parent.is_dir:
        raise _error(errno.ENOTDIR, parent_path)
    if ov.resolve(path) is not None:
        raise _error(errno.EEXIST, path)
    copy_up(ov, parent_path)
    uid, gid, mode = _new_owner(ov, parent, caller, mode)
    work, temp = ov.work_fd, ov.temp_name()
    fd = _make_temp(work, temp, mode, rdev, target, open_flags)
    try:
        os.chown(temp, uid, gid, dir_fd=work, follow_symlinks=False)
        if not stat.S_ISLNK(mode):  # after chown, which clears setgid
            os.chmod(temp, stat.S_IMODE(mode), dir_fd=work)
        if stat.S_ISDIR(mode) and ov.opts.redirect_dir and parent.has_lower:
            # The kernel does so when offline layer changes are not allowed: a lower
            # dir redirected here later must not merge into a new directory.
            _set_opaque(ov, at_path(work, temp))
        _publish_new(ov, parent_path, name, temp, is_dir=stat.S_ISDIR(mode))
    except BaseException:
        if fd is not None:
            os.close(fd)
        _remove_temp(ov, temp)
        raise
    ov.invalidate(path)
    return ov.lookup(path), fd


def _make_temp(
    work: int, temp: bytes, mode: int, rdev: int, target: bytes | None, open_flags: int | None
) -> int | None:
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFREG:
        flags = os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        flags |= (open_flags or os.O_RDONLY) & (os.O_ACCMODE | os.O_APPEND)
        fd = os.open(temp, flags, 0o600, dir_fd=work)
        if open_flags is None:
            os.close(fd)
            return None
        return fd
    if kind == stat.S_IFDIR:
        os.mkdir(temp, 0o700, dir_fd=work)
    elif kind == stat.S_IFLNK:
        if target is None:
            raise _error(errno.EINVAL)
        os.symlink(target, temp, dir_fd=work)
    elif kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
        os.mknod(temp, kind | 0o600, rdev, dir_fd=work)
    else:
        raise _error(errno.EINVAL)
    return None


def _new_owner(ov: Overlay, parent: Resolved, caller: Caller, mode: int) -> tuple[int, int, int]:
    """Owner and mode of a new object: a setgid directory passes on its group (and, to
    subdirectories, the setgid bit), as the upper filesystem would."""
    parent_st = ov.stat_of(parent)
    if parent_st.st_mode & stat.S_ISGID:
        if stat.S_ISDIR(mode):
            mode |= stat.S_ISGID
        return caller.uid, parent_st.st_gid, mode
    return caller.uid, caller.gid, mode


def _publish_new(
    ov: Overlay, parent_path: bytes, name: bytes, temp: bytes, *, is_dir: bool
) -> None:
    """Move a finished object from the work dir to ``name``, replacing a whiteout there."""
    upper = ov.upper_dir_fd(parent_path)
    existing = _upper_entry(ov, parent_path, name)
    work = ov.work_fd
    if existing is None:
        if is_dir and has_whiteout_file(upper, name):
            _set_opaque(ov, at_path(work, temp))
        renameat2(work, temp, upper, name, RENAME_NOREPLACE)
    elif existing == "whiteout":
        if is_dir:
            _set_opaque(ov, at_path(work, temp))
            # rename(2) cannot put a directory over a device: swap, then drop the whiteout
            renameat2(work, temp, upper, name, RENAME_EXCHANGE)
            os.unlink(temp, dir_fd=work)
        else:
            renameat2(work, temp, upper, name, 0)
    else:
        raise _error(errno.EEXIST, join(parent_path, name))


def _upper_entry(ov: Overlay, parent_path: bytes, name: bytes) -> str | None:
    """What upper holds at ``name``: None, "whiteout" or "object"."""
    upper = ov.upper_dir_fd(parent_path)
    try:
        st = os.stat(name, dir_fd=upper, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if is_whiteout(st):
        return "whiteout"
    parent = ov.lookup(parent_path)
    if parent.in_upper and parent.markers[0].xattr_whiteouts and is_xattr_whiteout(upper, name, st):
        return "whiteout"
    return "object"


def _set_opaque(ov: Overlay, target: bytes) -> None:
    os.setxattr(target, ov.xattr_prefix + "opaque", b"y", follow_symlinks=False)


def _remove_temp(ov: Overlay, temp: bytes) -> None:
    try:
        st = os.stat(temp, dir_fd=ov.work_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(temp, dir_fd=ov.work_fd)
    else:
        os.unlink(temp, dir_fd=ov.work_fd)


def _make_whiteout(ov: Overlay, temp: bytes) -> None:
    os.mknod(temp, stat.S_IFCHR, os.makedev(0, 0), dir_fd=ov.work_fd)


def link(ov: Overlay, path: bytes, new_path: bytes) -> Resolved:
    """A new name for a non-directory; copy-up first breaks any link to a lower inode."""
    ov.require_writable()
    src = ov.lookup(path)
    if src.is_dir:
        raise _error(errno.EPERM, path)
    new_parent, new_name = split(new_path)
    if not ov.lookup(new_parent).is_dir:
        raise _error(errno.ENOTDIR, new_parent)
    if ov.resolve(new_path) is not None:
        raise _error(errno.EEXIST, new_path)
    copy_up(ov, path)
    copy_up(ov, new_parent)
    src_parent, src_name = split(path)
    temp = ov.temp_name()
    os.link(
        src_name,
        temp,
        src_dir_fd=ov.upper_dir_fd(src_parent),
        dst_dir_fd=ov.work_fd,
        follow_symlinks=False,
    )
    try:
        _publish_new(ov, new_parent, new_name, temp, is_dir=False)
    except BaseException:
        _remove_temp(ov, temp)
        raise
    ov.invalidate(new_path)
    return ov.lookup(new_path)


# -- removing ---------------------------------------------------------------------------


def unlink(ov: Overlay, path: bytes) -> None:
    res = ov.lookup(path)
    if res.is_dir:
        raise _error(errno.EISDIR, path)
    _remove(ov, path, res)


def rmdir(ov: Overlay, path: bytes) -> None:
    res = ov.lookup(path)
    if not res.is_dir:
        raise _error(errno.ENOTDIR, path)
    if not path:
        raise _error(errno.EBUSY, path)
    if not readdir.is_empty(ov.stack, res):
        raise _error(errno.ENOTEMPTY, path)
    _remove(ov, path, res)


def _remove(ov: Overlay, path: bytes, res: Resolved) -> None:
    ov.require_writable()
    parent_path, name = split(path)
    parent = ov.lookup(parent_path)
    needs_whiteout = ov.lower_positive(parent, name)
    copy_up(ov, parent_path)
    upper = ov.upper_dir_fd(parent_path)
    work, temp = ov.work_fd, ov.temp_name()
    old_st = ov.stat_of(res) if res.in_upper else None
    if not res.in_upper:
        _make_whiteout(ov, temp)
        renameat2(work, temp, upper, name, RENAME_NOREPLACE)
    elif res.is_dir:
        # Move the directory out of the view in one step, then empty it in the work dir:
        # removing its whiteouts in place could let lower entries resurface on a crash.
        if needs_whiteout:
            _make_whiteout(ov, temp)
            renameat2(work, temp, upper, name, RENAME_EXCHANGE)
        else:
            renameat2(upper, name, work, temp, RENAME_NOREPLACE)
        shutil.rmtree(temp, dir_fd=work)
    elif needs_whiteout:
        _make_whiteout(ov, temp)
        renameat2(work, temp, upper, name, 0)
    else:
        os.unlink(name, dir_fd=upper)
    if old_st is not None and (res.is_dir or old_st.st_nlink <= 1):
        ov.numbers.release(old_st)
    _forget(ov, path, is_dir=res.is_dir)


def _forget(ov: Overlay, path: bytes, *, is_dir: bool) -> None:
    """Drop what we cached about ``path``; below it only for a directory, since that
    means scanning the caches."""
    ov.invalidate(path, subtree=is_dir)
    if is_dir and ov.stack.upper is not None:
        ov.stack.forget_dirs(ov.stack.upper, path)


# -- renaming ---------------------------------------------------------------------------


def rename(ov: Overlay, old: bytes, new: bytes, flags: int = 0) -> None:
    """rename(2) with RENAME_NOREPLACE and RENAME_EXCHANGE, in the kernel's way."""
    checked = check_rename(ov, old, new, flags)
    if checked is None:
        return
    src, dst = checked
    exchange = bool(flags & RENAME_EXCHANGE)
    old_parent, old_name = split(old)
    new_parent = split(new)[0]
    needs_whiteout = not exchange and ov.lower_positive(ov.lookup(old_parent), old_name)
    copy_up(ov, old)
    copy_up(ov, new_parent)
    if exchange:
        copy_up(ov, new)
    elif dst is not None and dst.is_dir and dst.in_upper and dst.has_lower:
        _clear_upper_dir(ov, new)
    _mark_moved_dir(ov, ov.lookup(old), src, new_parent, old_parent)
    if exchange:
        assert dst is not None
        _mark_moved_dir(ov, ov.lookup(new), dst, old_parent, new_parent)
    replaced = ov.stat_of(dst) if dst is not None and dst.in_upper and not exchange else None
    _rename_upper(ov, old, new, exchange=exchange, whiteout=needs_whiteout, is_dir=src.is_dir)
    if replaced is not None and (dst is not None and (dst.is_dir or replaced.st_nlink <= 1)):
        ov.numbers.release(replaced)
    dirs = src.is_dir or (dst is not None and dst.is_dir)
    _forget(ov, old, is_dir=dirs)
    _forget(ov, new, is_dir=dirs)


def check_rename(
    ov: Overlay, old: bytes, new: bytes, flags: int
) -> tuple[Resolved, Resolved | None] | None:
    """Every error rename(2) can give before anything changes (nothing is copied up
    for a rename that fails); None for a rename that has nothing to do."""
    ov.require_writable()
    exchange = bool(flags & RENAME_EXCHANGE)
    if flags & ~(RENAME_EXCHANGE | RENAME_NOREPLACE) or (exchange and flags & RENAME_NOREPLACE):
        raise _error(errno.EINVAL)
    src = ov.lookup(old)
    dst = ov.resolve(new)
    _check_names(ov, old, new, src, dst, flags)
    if old == new or (dst is not None and _same_object(ov, src, dst)):
        return None
    for res in (src, dst) if exchange else (src,):
        if res is not None and res.is_dir and res.has_lower and not ov.opts.redirect_dir:
            raise _error(errno.EXDEV, res.path)
    # Only a directory that merges lower layers is checked here; for one that lives only
    # in upper the rename itself says ENOTEMPTY, after the steps before it (marking the
    # moved directory opaque), as in the kernel.
    merged_dst = not exchange and dst is not None and dst.is_dir and dst.has_lower
    if merged_dst and not readdir.is_empty(ov.stack, dst):
        raise _error(errno.ENOTEMPTY, new)
    return src, dst


def _check_names(
    ov: Overlay, old: bytes, new: bytes, src: Resolved, dst: Resolved | None, flags: int
) -> None:
    if not old:
        raise _error(errno.EBUSY)
    if new.startswith(old + b"/"):
        raise _error(errno.EINVAL, new)
    if not ov.lookup(split(new)[0]).is_dir:
        raise _error(errno.ENOTDIR, new)
    if flags & RENAME_EXCHANGE:
        if dst is None:
            raise _error(errno.ENOENT, new)
        if old.startswith(new + b"/"):
            raise _error(errno.EINVAL, old)
        return
    if dst is None:
        return
    if flags & RENAME_NOREPLACE:
        raise _error(errno.EEXIST, new)
    if src.is_dir and not dst.is_dir:
        raise _error(errno.ENOTDIR, new)
    if dst.is_dir and not src.is_dir:
        raise _error(errno.EISDIR, new)


def _same_object(ov: Overlay, src: Resolved, dst: Resolved) -> bool:
    """Two names of one inode: rename(2) does nothing and succeeds.

    Only for upper objects: with index=off the kernel gives each name of a multiply
    linked lower file its own overlay inode, so renaming one over the other goes ahead.
    """
    if src.is_dir or dst.is_dir or src.top[0] is not dst.top[0] or not src.in_upper:
        return False
    a, b = ov.stat_of(src), ov.stat_of(dst)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _mark_moved_dir(
    ov: Overlay, moved: Resolved, before: Resolved, to_parent: bytes, from_parent: bytes
) -> None:
    """Mark a directory about to move so lookups at its new place merge the right way.

    One with lower copies records where they are (``overlay.redirect``); one that lives
    only in upper becomes opaque when its new parent merges lower layers, so it cannot
    pick up a lower directory of the same name there. The kernel marks it so even for a
    rename inside one parent, and so do we: the upper formats must match.
    """
    if not moved.is_dir:
        return
    relpath = moved.top[1]
    target = at_path(ov.upper_dir_fd(split(relpath)[0]), split(relpath)[1])
    if before.has_lower:
        redirect = _redirect_for(before, same_dir=to_parent == from_parent)
        if redirect is not None:
            os.setxattr(target, ov.xattr_prefix + "redirect", redirect, follow_symlinks=False)
    elif not before.is_opaque and ov.lookup(to_parent).has_lower:
        _set_opaque(ov, target)


def _redirect_for(before: Resolved, *, same_dir: bool) -> bytes | None:
    """The ``overlay.redirect`` value the kernel writes, or None to keep the current one.

    As the kernel's ``ovl_set_redirect``: a move inside one parent records the old name
    (relative), a move elsewhere the absolute path of the lower copy; a redirect already
    there is kept when it still fits (any one for a same-dir move, an absolute one always).
    """
    current = before.markers[0].redirect if before.in_upper else None
    if current is not None and (same_dir or current.startswith(b"/")):
        return None
    if same_dir:
        return split(before.path)[1]
    return b"/" + next(rel for lay, rel in before.layers if not lay.upper)


def _clear_upper_dir(ov: Overlay, path: bytes) -> None:
    """Replace the upper copy of an (in the merged view) empty directory by an empty
    opaque one, atomically, so rename(2) can replace it."""
    parent_path, name = split(path)
    upper = ov.upper_dir_fd(parent_path)
    st = os.stat(name, dir_fd=upper, follow_symlinks=False)
    work, temp = ov.work_fd, ov.temp_name()
    os.mkdir(temp, 0o700, dir_fd=work)
    try:
        os.chown(temp, st.st_uid, st.st_gid, dir_fd=work)
        os.chmod(temp, stat.S_IMODE(st.st_mode), dir_fd=work)
        _set_opaque(ov, at_path(work, temp))
        renameat2(work, temp, upper, name, RENAME_EXCHANGE)
    except BaseException:
        os.rmdir(temp, dir_fd=work)
        raise
    shutil.rmtree(temp, dir_fd=work)
    _forget(ov, path, is_dir=True)


def _rename_upper(
    ov: Overlay, old: bytes, new: bytes, *, exchange: bool, whiteout: bool, is_dir: bool
) -> None:
    old_parent, old_name = split(old)
    new_parent, new_name = split(new)
    old_fd = ov.upper_dir_fd(old_parent)
    new_fd = ov.upper_dir_fd(new_parent)
    if exchange:
        renameat2(old_fd, old_name, new_fd, new_name, RENAME_EXCHANGE)
        return
    if _upper_entry(ov, new_parent, new_name) == "whiteout":
        # A directory cannot replace a whiteout device: swap them, then keep the
        # whiteout at the old name if one is needed there. The kernel reuses the
        # target's whiteout for files too (its mode shows in upper), so we do the same.
        renameat2(old_fd, old_name, new_fd, new_name, RENAME_EXCHANGE)
        if not whiteout:
            os.unlink(old_name, dir_fd=ov.upper_dir_fd(old_parent))
        return
    renameat2(old_fd, old_name, new_fd, new_name, RENAME_WHITEOUT if whiteout else 0)
