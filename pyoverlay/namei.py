"""Lookup: resolving a name across the layers, as the kernel's ``namei.c`` does.

The rules, top layer first:
- a whiteout (char 0/0, an xattr whiteout, or a ``.wh.NAME`` file) hides the name below;
- the first non-directory hides everything below it;
- directories merge until one is opaque, or until a layer holds a non-directory;
- a directory's ``overlay.redirect`` sends the search in the layers below to another path.

:func:`lookup_child` is the pure-Python reference; ``pyoverlay._native`` implements the
same function in C and the two are tested against each other.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat

from pyoverlay import native
from pyoverlay.layers import (
    NO_MARKERS,
    NOT_A_DIR,
    DirMarkers,
    Layer,
    LayerStack,
    has_whiteout_file,
    is_whiteout,
    is_whiteout_name,
    is_xattr_whiteout,
    join,
    read_dir_markers,
    split,
)


@dataclasses.dataclass(frozen=True, slots=True)
class Resolved:
    """Where one merged object lives: which layers hold it, at which path in each.

    ``layers`` is topmost first; a non-directory has exactly one. A directory lists every
    layer it merges from; ``markers`` are the markers of each of those copies.
    """

    path: bytes
    layers: tuple[tuple[Layer, bytes], ...]
    is_dir: bool
    markers: tuple[DirMarkers, ...] = ()

    @property
    def top(self) -> tuple[Layer, bytes]:
        return self.layers[0]

    @property
    def in_upper(self) -> bool:
        return self.layers[0][0].upper

    @property
    def has_lower(self) -> bool:
        return any(not layer.upper for layer, _ in self.layers)

    @property
    def is_merged(self) -> bool:
        """A directory with copies in more than one layer (the kernel's OVL_TYPE_MERGE)."""
        return self.is_dir and len(self.layers) > 1

    @property
    def is_opaque(self) -> bool:
        return bool(self.markers) and self.markers[0].opaque


def root(stack: LayerStack) -> Resolved:
    """The merged root: every layer's root directory, opaque markers ignored as the kernel does."""
    layers = tuple((layer, b"") for layer in stack.layers)
    markers = tuple(_markers(layer.fd) for layer in stack.layers)
    return Resolved(b"", layers, True, markers)


def lookup_child(stack: LayerStack, parent: Resolved, name: bytes) -> Resolved | None:
    """Resolve ``name`` inside the merged directory ``parent``; None if it is not visible."""
    if not parent.is_dir:
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
    if is_whiteout_name(name):
        return None
    if native.ACTIVE:  # issue 4: the C helper answers in one call unless it declines
        res = native.lookup_child(stack, parent, name)
        if res is not native.DECLINED:
            return res
    if name in (b"", b".", b"..") or b"/" in name or b"\0" in name:
        return None  # not one component: it would leave the directory, or the layer
    found: list[tuple[Layer, bytes]] = []
    markers: list[DirMarkers] = []
    candidates = list(zip(parent.layers, parent.markers, strict=True))
    search = name  # the name (or redirect path) to look for in the next layers
    i = 0
    while i < len(candidates):
        (layer, parent_rel), parent_markers = candidates[i]
        i += 1
        parent_fd = stack.try_dir_fd(layer, parent_rel)
        if parent_fd is None:
            continue
        st = _lstat(parent_fd, search)
        if st is None:
            if has_whiteout_file(parent_fd, search):
                break
            continue
        if is_whiteout(st) or (
            parent_markers.xattr_whiteouts and is_xattr_whiteout(parent_fd, search, st)
        ):
            break
        relpath = join(parent_rel, search)
        if not stat.S_ISDIR(st.st_mode):
            if not found:
                return Resolved(join(parent.path, name), ((layer, relpath),), False)
            break  # a non-directory below a directory ends the merge
        dir_markers = _child_markers(stack, layer, relpath)
        found.append((layer, relpath))
        markers.append(dir_markers)
        if dir_markers.opaque or has_whiteout_file(parent_fd, search):
            break
        if dir_markers.redirect:
            redirected = _follow_redirect(stack, layer, dir_markers.redirect)
            if redirected is None:  # relative: a new name in the same parent directories
                search = dir_markers.redirect
            else:
                (candidates, search), i = redirected, 0
    if not found:
        return None
    return Resolved(join(parent.path, name), tuple(found), True, tuple(markers))


def _follow_redirect(
    stack: LayerStack, layer: Layer, redirect: bytes
) -> tuple[list[tuple[tuple[Layer, bytes], DirMarkers]], bytes] | None:
    """Where the layers below ``layer`` must look after a directory's redirect.

    An absolute redirect names a path from the layer roots: the search goes on in every
    layer below ``layer``. A relative one is a new name in the same parent directories;
    None tells the caller to keep its candidates. A redirect that tries to climb (``..``)
    or is malformed ends the search (no candidates).
    """
    if not redirect.startswith(b"/"):
        if b"/" in redirect or redirect in (b"", b".", b".."):
            return [], b""
        return None
    target = redirect.strip(b"/")
    if not target or any(p in (b"", b".", b"..") for p in target.split(b"/")):
        return [], b""
    parent, name = split(target)
    candidates = []
    for lower in stack.layers[layer.index + 1 :]:
        fd = stack.try_dir_fd(lower, parent)
        if fd is not None:
            candidates.append(((lower, parent), _markers(fd)))
    return candidates, name


def _child_markers(stack: LayerStack, layer: Layer, relpath: bytes) -> DirMarkers:
    fd = stack.try_dir_fd(layer, relpath)
    return _markers(fd) if fd is not None else NO_MARKERS


def _markers(fd: int) -> DirMarkers:
    try:
        return read_dir_markers(fd)
    except OSError as exc:
        if exc.errno in NOT_A_DIR:
            return NO_MARKERS
        raise


def _lstat(dirfd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in NOT_A_DIR:
            return None
        raise


def resolve_path(stack: LayerStack, path: bytes) -> Resolved | None:
    """Resolve a merged path component by component from the root."""
    current: Resolved | None = root(stack)
    for name in path.split(b"/") if path else ():
        if current is None or not current.is_dir:
            return None
        current = lookup_child(stack, current, name)
    return current
