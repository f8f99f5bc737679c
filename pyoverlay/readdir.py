"""Merged directory listings, as the kernel's ``readdir.c`` builds them.

Every layer copy of the directory is read, top first: names already seen are dropped,
whiteouts and marker files are filtered out, and a name hidden by a whiteout in one
layer stays hidden in all layers below. The result is a list the caller keeps per open
directory handle, so offsets (indexes into it) stay valid across several readdir calls.
"""

from __future__ import annotations

import os
import stat

from pyoverlay import native
from pyoverlay.layers import (
    LayerStack,
    is_whiteout,
    is_whiteout_name,
    is_xattr_whiteout,
)
from pyoverlay.namei import Resolved


def merged_names(stack: LayerStack, directory: Resolved) -> list[bytes]:
    """Visible names of a merged directory (no ``.``/``..``), topmost layer first."""
    if native.ACTIVE:  # issue 4: the C helper reads every layer in one call unless it declines
        names = native.merged_names(stack, directory)
        if names is not native.DECLINED:
            return names
    seen: set[bytes] = set()
    hidden: set[bytes] = set()
    names: list[bytes] = []
    for (layer, relpath), markers in zip(directory.layers, directory.markers, strict=True):
        fd = stack.try_dir_fd(layer, relpath)
        if fd is None:
            continue
        layer_hidden: set[bytes] = set()
        for name, entry in _scan(fd):
            if name in seen or name in hidden:
                continue
            if is_whiteout_name(name):
                layer_hidden.add(name[4:])
            elif _entry_is_whiteout(fd, name, entry, markers.xattr_whiteouts):
                layer_hidden.add(name)
            else:
                seen.add(name)
                names.append(name)
        # A .wh.NAME hides NAME below this layer, not a NAME in this same layer.
        hidden |= layer_hidden - seen
    return names


def is_empty(stack: LayerStack, directory: Resolved) -> bool:
    return not merged_names(stack, directory)


def _scan(fd: int) -> list[tuple[bytes, os.DirEntry[str]]]:
    with os.scandir(fd) as it:
        return [(os.fsencode(entry.name), entry) for entry in it]


def _entry_is_whiteout(fd: int, name: bytes, entry: os.DirEntry[str], xwhiteouts: bool) -> bool:
    # d_type saves a stat for everything but character devices (and, in directories
    # that hold xattr whiteouts, regular files).
    try:
        if entry.is_dir(follow_symlinks=False) or entry.is_symlink():
            return False
        if entry.is_file(follow_symlinks=False):
            if not xwhiteouts:
                return False
            st = entry.stat(follow_symlinks=False)
            return stat.S_ISREG(st.st_mode) and is_xattr_whiteout(fd, name, st)
        return is_whiteout(entry.stat(follow_symlinks=False))
    except FileNotFoundError:
        return True  # gone while we read: not visible
