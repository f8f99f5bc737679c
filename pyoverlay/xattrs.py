"""Extended attributes: what users may see and change, and what stays the overlay's own.

As kernel overlayfs (6.7 and later) does, a name in the mount's own namespace
(``trusted.overlay.X``, or ``user.overlay.X`` with ``userxattr``) is *escaped*: it is
stored as ``trusted.overlay.overlay.X`` in the layers and listed back as
``trusted.overlay.X``, so users (a nested overlay, say) can use such names without ever
reaching the overlay's real markers. The other private names (``user.overlay.*`` without
``userxattr``, ``user.fuseoverlayfs.*``) are never listed, read or written. Setting or
removing an xattr copies the object up first. Only root lists ``trusted.*`` names.
"""

from __future__ import annotations

import errno
import os

from pyoverlay.copy_up import copy_up
from pyoverlay.layers import is_private_xattr
from pyoverlay.namei import Resolved
from pyoverlay.overlay import Overlay
from pyoverlay.util import at_path


def _real_path(ov: Overlay, res: Resolved) -> bytes:
    _, parent_fd, name = ov.top_parent(res)
    # For the root, "." reaches the directory itself: without it, the no-follow xattr
    # calls would act on /proc's magic link, not on the layer root.
    return at_path(parent_fd, name or b".")


def _private(name: str) -> OSError:
    # The kernel answers requests for its own xattr names as if they did not exist.
    return OSError(errno.ENODATA, os.strerror(errno.ENODATA), name)


def escape_prefix(ov: Overlay) -> str:
    """Where escaped names live in the layers: ``trusted.overlay.overlay.``."""
    return ov.xattr_prefix + "overlay."


def stored_name(ov: Overlay, name: str) -> str | None:
    """The name a user's xattr ``name`` has in the layers; None for a private name."""
    if name.startswith(ov.xattr_prefix):
        return escape_prefix(ov) + name[len(ov.xattr_prefix) :]
    return None if is_private_xattr(name) else name


def shown_name(ov: Overlay, stored: str) -> str | None:
    """The name users see for a stored xattr name; None if they must not see it."""
    escaped = escape_prefix(ov)
    if stored.startswith(escaped):
        return ov.xattr_prefix + stored[len(escaped) :]
    return None if is_private_xattr(stored) else stored


def getxattr(ov: Overlay, path: bytes, name: str) -> bytes:
    stored = stored_name(ov, name)
    if stored is None:
        raise _private(name)
    return os.getxattr(_real_path(ov, ov.lookup(path)), stored, follow_symlinks=False)


def listxattr(ov: Overlay, path: bytes, *, privileged: bool = True) -> list[str]:
    """Names users see; ``trusted.*`` only for a ``privileged`` caller, as in the kernel."""
    names = os.listxattr(_real_path(ov, ov.lookup(path)), follow_symlinks=False)
    shown = [n for n in (shown_name(ov, stored) for stored in names) if n is not None]
    return shown if privileged else [n for n in shown if not n.startswith("trusted.")]


def _writable_name(ov: Overlay, name: str) -> str:
    stored = stored_name(ov, name)
    if stored is None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), name)
    return stored


def check_settable(ov: Overlay, name: str) -> None:
    """Refuse a private name before anything is copied up for it."""
    _writable_name(ov, name)


def setxattr(ov: Overlay, path: bytes, name: str, value: bytes, flags: int = 0) -> None:
    stored = _writable_name(ov, name)
    ov.require_writable()
    res = copy_up(ov, path)
    os.setxattr(_real_path(ov, res), stored, value, flags, follow_symlinks=False)


def removexattr(ov: Overlay, path: bytes, name: str) -> None:
    stored = _writable_name(ov, name)
    ov.require_writable()
    res = ov.lookup(path)
    # Check first so that removing a missing xattr copies nothing up.
    os.getxattr(_real_path(ov, res), stored, follow_symlinks=False)
    res = copy_up(ov, path)
    os.removexattr(_real_path(ov, res), stored, follow_symlinks=False)
