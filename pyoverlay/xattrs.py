"""Extended attributes: what users may see and change, and what stays the overlay's own.

Private overlay xattrs (``trusted.overlay.*``, ``user.overlay.*``,
``user.fuseoverlayfs.*``) are never listed, read or written through the mount. Setting or
removing any other xattr copies the object up first.
"""

from __future__ import annotations

import errno
import os

from pyoverlay.copy_up import copy_up
from pyoverlay.layers import is_private_xattr, split
from pyoverlay.namei import Resolved
from pyoverlay.overlay import Overlay
from pyoverlay.util import at_path


def _real_path(ov: Overlay, res: Resolved) -> bytes:
    layer, relpath = res.top
    if not relpath:
        return b"/proc/self/fd/%d" % layer.fd
    parent, name = split(relpath)
    return at_path(ov.stack.dir_fd(layer, parent), name)


def _private(name: str) -> OSError:
    # The kernel answers requests for its own xattr names as if they did not exist.
    return OSError(errno.ENODATA, os.strerror(errno.ENODATA), name)


def getxattr(ov: Overlay, path: bytes, name: str) -> bytes:
    if is_private_xattr(name):
        raise _private(name)
    return os.getxattr(_real_path(ov, ov.lookup(path)), name, follow_symlinks=False)


def listxattr(ov: Overlay, path: bytes) -> list[str]:
    names = os.listxattr(_real_path(ov, ov.lookup(path)), follow_symlinks=False)
    return [name for name in names if not is_private_xattr(name)]


def setxattr(ov: Overlay, path: bytes, name: str, value: bytes, flags: int = 0) -> None:
    if is_private_xattr(name):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), name)
    ov.require_writable()
    res = copy_up(ov, path)
    os.setxattr(_real_path(ov, res), name, value, flags, follow_symlinks=False)


def removexattr(ov: Overlay, path: bytes, name: str) -> None:
    if is_private_xattr(name):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), name)
    ov.require_writable()
    res = ov.lookup(path)
    # Check first so that removing a missing xattr copies nothing up.
    os.getxattr(_real_path(ov, res), name, follow_symlinks=False)
    res = copy_up(ov, path)
    os.removexattr(_real_path(ov, res), name, follow_symlinks=False)
