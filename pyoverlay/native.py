"""Which implementation answers lookups and merged listings: the C helper or Python.

Owns the choice and the thin adapters around ``pyoverlay._native``. The C helper is used
by default when it imports; ``PYOVERLAY_NATIVE=0`` (read at import, inherited by the mount
daemon) forces the pure-Python reference in ``namei.py`` and ``readdir.py``.

The adapters take the same arguments as ``namei.lookup_child`` and
``readdir.merged_names`` and build the same objects. Whenever the C helper meets a case it
leaves to the reference (a redirect, an error the reference would raise, an unusual
name), they return :data:`DECLINED` and the caller runs the reference instead, so both
paths always give identical answers.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pyoverlay.layers import NO_MARKERS, DirMarkers, LayerStack

if TYPE_CHECKING:
    from pyoverlay.namei import Resolved

#: Returned by the adapters when the Python reference must answer.
DECLINED: Any = NotImplemented
_OFF_VALUES = frozenset({"0", "off", "no", "false"})


def _load() -> ModuleType | None:
    if os.environ.get("PYOVERLAY_NATIVE", "").strip().lower() in _OFF_VALUES:
        return None  # not even imported, so a daemon's memory map shows the choice
    try:
        from pyoverlay import _native
    except ImportError:
        return None
    return _native


_native = _load()
#: Read by namei/readdir on every call; change it with :func:`set_active`.
ACTIVE: bool = _native is not None
#: DirMarkers for each combination of the C helper's OPAQUE | XWHITEOUTS bits.
_MARKERS = (NO_MARKERS, DirMarkers(True, False), DirMarkers(False, True), DirMarkers(True, True))
if _native is not None:
    _native.set_markers(_MARKERS)


def available() -> bool:
    """Did the C helper import (and was it not switched off by PYOVERLAY_NATIVE=0)?"""
    return _native is not None


def set_active(active: bool) -> bool:
    """Use the C helper (True) or the Python reference (False); returns the old setting."""
    global ACTIVE
    if active and _native is None:
        raise RuntimeError("pyoverlay._native is not available (not built, or PYOVERLAY_NATIVE=0)")
    old, ACTIVE = ACTIVE, active
    return old


def implementation() -> str:
    return "native" if ACTIVE else "python"


def _parent_fds(stack: LayerStack, parent: Resolved) -> list[int | None] | None:
    """The cached fd of every layer copy of ``parent`` (None where it is missing).

    None when they cannot all be held at once: the stack's fd cache may close an fd when
    later ones are opened, and every lookup touches at most depth + 1 entries per layer.
    Redirected parents (a relpath other than the merged path) go to the reference too.
    """
    path = parent.path
    if len(parent.layers) * (path.count(b"/") + 2) >= stack._cache_size:
        return None
    fds: list[int | None] = []
    try:
        for layer, rel in parent.layers:
            if rel != path:
                return None
            fds.append(stack.try_dir_fd(layer, rel) if rel else layer.fd)
    except OSError:
        return None  # the reference raises it at the same point, or never gets there
    return fds


def lookup_child(stack: LayerStack, parent: Resolved, name: bytes) -> Resolved | None:
    """``namei.lookup_child`` in one C call, or :data:`DECLINED`."""
    assert _native is not None
    # The C side reads the stack's fd cache as try_dir_fd does and calls try_dir_fd for
    # what is not cached yet, so both paths share one cache and open the same fds.
    return _native.lookup_child(parent, name, stack._dirs, stack.try_dir_fd, stack._cache_size)


def merged_names(stack: LayerStack, directory: Resolved) -> list[bytes]:
    """``readdir.merged_names`` in one C call, or :data:`DECLINED`."""
    assert _native is not None
    fds = _parent_fds(stack, directory)
    if fds is None:
        return DECLINED
    dirs = [
        (fd, markers.xattr_whiteouts, stack.open_flags(layer))
        for fd, (layer, _), markers in zip(fds, directory.layers, directory.markers, strict=True)
    ]
    return _native.merged_names(dirs)
