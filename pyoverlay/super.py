"""Mount and unmount: checking the layers, starting the daemon, going to the background.

The counterpart of the kernel's ``fs/overlayfs/super.c``. Every check that can fail is
made before anything is mounted, and each failure is one line naming the path and the
problem. The daemon forks after the checks; the parent returns only once the child
reports the mount live (or exits non-zero with the child's reason).
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import resource
import signal
import subprocess
from pathlib import Path

from pyoverlay.errors import PyoverlayError
from pyoverlay.params import MountOptions

log = logging.getLogger("pyoverlay")

#: Entries a work directory may hold from an earlier mount (ours or the kernel's).
_WORK_LEFTOVERS = frozenset({"work", "index"})


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
    _check_fuse()
    validate(opts, mountpoint)
    if foreground:
        _serve(opts, mountpoint, debug=debug, pid_file=pid_file, ready_fd=None)
        return
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _daemon_child(opts, mountpoint, debug, pid_file, write_fd)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        report = pipe.read().decode(errors="replace").strip()
    if report != "ok":
        os.waitpid(pid, 0)
        raise PyoverlayError(report or "the mount daemon exited before mounting")


def _daemon_child(
    opts: MountOptions, mountpoint: str, debug: bool, pid_file: str | None, ready_fd: int
) -> None:
    code = 1
    try:
        os.setsid()
        _detach_stdio()
        _log_to_syslog()
        _serve(opts, mountpoint, debug=debug, pid_file=pid_file, ready_fd=ready_fd)
        code = 0
    except PyoverlayError as exc:
        _report(ready_fd, str(exc))
    except BaseException as exc:  # the parent must hear about any failure
        log.exception("daemon failed")
        _report(ready_fd, f"daemon failed: {exc}")
    finally:
        os._exit(code)


def _report(fd: int | None, message: str) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, message.encode() + b"\n")
        os.close(fd)


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _log_to_syslog() -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if os.path.exists("/dev/log"):
        handler: logging.Handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("pyoverlay[%(process)d]: %(message)s"))
    else:
        handler = logging.NullHandler()
    root.addHandler(handler)


def _serve(
    opts: MountOptions, mountpoint: str, *, debug: bool, pid_file: str | None, ready_fd: int | None
) -> None:
    import pyfuse3
    import trio

    from pyoverlay.fuse_ops import OverlayOperations
    from pyoverlay.overlay import Overlay

    _raise_fd_limit()
    overlay = Overlay(opts)
    ops = OverlayOperations(overlay, debug=debug)
    try:
        pyfuse3.init(ops, mountpoint, fuse_options(opts))
    except RuntimeError as exc:
        overlay.close()
        raise PyoverlayError(f"cannot mount on {mountpoint}: {exc}") from None
    if pid_file:
        Path(pid_file).write_text(f"{os.getpid()}\n")
    _report(ready_fd, "ok")
    log.info("mounted %s on %s", ":".join(opts.lowerdirs), mountpoint)
    terminated_by_signal = False

    async def run() -> None:
        nonlocal terminated_by_signal
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, nursery.cancel_scope)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    async def _watch_signals(scope: trio.CancelScope) -> None:
        nonlocal terminated_by_signal
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for _ in signals:
                terminated_by_signal = True
                pyfuse3.terminate()
                return

    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=terminated_by_signal or _is_mounted(mountpoint))
        overlay.close()
        if pid_file:
            with contextlib.suppress(OSError):
                os.unlink(pid_file)


def fuse_options(opts: MountOptions) -> set[str]:
    """The options handed to libfuse for this mount."""
    options = {"fsname=pyoverlay", "subtype=pyoverlay", "default_permissions"}
    if os.geteuid() == 0:
        # Every user sees the mount and the kernel checks modes; setuid files and device
        # nodes work as on a kernel overlay mount unless nosuid/nodev were asked for.
        options |= {"allow_other", "suid", "dev"}
    if opts.read_only:
        options.add("ro")
    if opts.noatime:
        options.add("noatime")
    for item in opts.fuse_options:
        if item.startswith("fsname="):
            options.discard("fsname=pyoverlay")
        if item in ("nosuid", "nodev", "noexec"):
            options.discard(item[2:])
        options.add(item)
    return options


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- checks ---------------------------------------------------------------------------------


def _check_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        raise PyoverlayError("/dev/fuse: not found (load the fuse module: modprobe fuse)")
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        raise PyoverlayError(f"pyfuse3 or libfuse3 is missing: {exc}") from None


def validate(opts: MountOptions, mountpoint: str) -> None:
    """Check the layers and the mount point; raise PyoverlayError naming the problem."""
    for lower in opts.lowerdirs:
        _require_dir(lower, "lower layer")
    if opts.upperdir is not None and opts.workdir is not None:
        _require_dir(opts.upperdir, "upper dir")
        _require_dir(opts.workdir, "work dir")
        _check_work(opts.upperdir, opts.workdir)
    _require_dir(mountpoint, "mount point")
    if _is_mounted(mountpoint):
        raise PyoverlayError(f"mount point {mountpoint}: already a mount point")
    _check_overlap(opts, mountpoint)


def _require_dir(path: str, what: str) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise PyoverlayError(f"{what} {path}: {exc.strerror}") from None
    if not (st.st_mode & 0o170000) == 0o040000:
        raise PyoverlayError(f"{what} {path}: not a directory")


def _check_work(upper: str, work: str) -> None:
    if os.stat(upper).st_dev != os.stat(work).st_dev:
        raise PyoverlayError(f"work dir {work}: not on the same filesystem as upper dir {upper}")
    extra = sorted(set(os.listdir(work)) - _WORK_LEFTOVERS)
    if extra:
        raise PyoverlayError(f"work dir {work}: not empty (contains {extra[0]!r})")


def _check_overlap(opts: MountOptions, mountpoint: str) -> None:
    named = [(f"lower layer {p}", p) for p in opts.lowerdirs]
    if opts.upperdir is not None and opts.workdir is not None:
        named += [
            (f"upper dir {opts.upperdir}", opts.upperdir),
            (f"work dir {opts.workdir}", opts.workdir),
        ]
    real = [(label, os.path.realpath(path)) for label, path in named]
    for i, (label_a, a) in enumerate(real):
        for label_b, b in real[i + 1 :]:
            if _overlap(a, b):
                raise PyoverlayError(f"{label_a} and {label_b} overlap")
    target = os.path.realpath(mountpoint)
    for label, path in real:
        if _overlap(target, path):
            raise PyoverlayError(f"mount point {mountpoint} overlaps {label}")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _overlap(a: str, b: str) -> bool:
    """Do two real paths overlap, by name or as directories of one file system?"""
    if _inside(a, b) or _inside(b, a):
        return True
    (dev_a, fs_a), (dev_b, fs_b) = _fs_location(a), _fs_location(b)
    return dev_a == dev_b and (_inside(fs_a, fs_b) or _inside(fs_b, fs_a))


def _fs_location(path: str) -> tuple[str, str]:
    """(device, path inside its file system) of a real path.

    A bind mount shows where its directory really is (mountinfo's root field), so two
    layers cannot hide that they overlap behind one.
    """
    dev, root, point = "", "/", "/"
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            candidate = _unescape(fields[4])
            # the longest mount point above the path wins; of stacked mounts, the last
            if _inside(path, candidate) and len(candidate) >= len(point):
                dev, root, point = fields[2].decode(), _unescape(fields[3]), candidate
    rest = path[len(point) :].lstrip("/")
    return dev, os.path.join(root, rest) if rest else root


def mount_points() -> dict[str, str]:
    """Mount point -> filesystem type, from /proc/self/mountinfo."""
    result = {}
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            point = _unescape(fields[4])
            result[point] = fields[sep + 1].decode(errors="replace")
    return result


def _unescape(field: bytes) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo octal escapes
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i : i + 1] == b"\\" and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return os.fsdecode(bytes(out))


def _is_mounted(path: str) -> bool:
    return os.path.realpath(path) in mount_points()


def unmount(mountpoint: str) -> None:
    """Unmount a pyoverlay mount; the daemon then exits."""
    target = os.path.realpath(mountpoint)
    fstype = mount_points().get(target)
    if fstype is None:
        raise PyoverlayError(f"{mountpoint}: not mounted")
    if fstype != "fuse.pyoverlay":
        raise PyoverlayError(f"{mountpoint}: not a pyoverlay mount ({fstype})")
    result = subprocess.run(
        ["fusermount3", "-u", target], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["fusermount3 failed"])[-1]
        raise PyoverlayError(f"cannot unmount {mountpoint}: {reason}")
