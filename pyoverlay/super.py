"""Mount and unmount: checking the layers, starting the daemon, going to the background.

The counterpart of the kernel's ``fs/overlayfs/super.c``.
"""

from __future__ import annotations

from pyoverlay.params import MountOptions


def mount(
    opts: MountOptions,
    mountpoint: str,
    *,
    foreground: bool = False,
    debug: bool = False,
    pid_file: str | None = None,
) -> None:
    """Mount the overlay at ``mountpoint``.

    Returns once the mount is live (the daemon keeps running in the background), or,
    with ``foreground``, when it has been unmounted. Raises PyoverlayError with a
    one-line reason if the mount cannot be made; nothing is left mounted then.
    """
    raise NotImplementedError


def unmount(mountpoint: str) -> None:
    """Unmount a pyoverlay mount; the daemon then exits."""
    raise NotImplementedError
