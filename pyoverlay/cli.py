"""Command line: argument parsing, one-line errors and exit codes.

Exit codes: 0 success, 1 a problem with the system or the data (the message names the
path and what is wrong), 2 bad usage. Nothing here prints a traceback for bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from pyoverlay.errors import PyoverlayError, UsageError
from pyoverlay.params import MountOptions, parse_lowerdir, parse_options

SUBCOMMANDS = ("mount", "umount", "containerd", "-h", "--help", "--version")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyoverlay", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version="pyoverlay 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    mount = sub.add_parser(
        "mount",
        help="mount an overlay",
        description="pyoverlay mount LOWER UPPER WORK MERGED | --read-only LOWER MERGED | "
        "-o lowerdir=..,upperdir=..,workdir=.. [SOURCE] MERGED",
    )
    mount.add_argument("paths", nargs="*", metavar="PATH")
    mount.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS")
    mount.add_argument("--read-only", "-r", action="store_true", help="mount read-only")
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    mount.add_argument("--debug", action="store_true", help="log one line per FUSE request")
    mount.add_argument("--userxattr", action="store_true", help="use user.overlay.* xattrs")
    mount.add_argument("--pid-file", help="write the daemon's pid here once mounted")
    mount.set_defaults(func=cmd_mount)

    umount = sub.add_parser("umount", help="unmount a pyoverlay mount")
    umount.add_argument("mountpoint")
    umount.set_defaults(func=cmd_umount)

    from pyoverlay.containerd.cli import register

    register(sub)
    return parser


def mount_options_from_args(args: argparse.Namespace) -> tuple[MountOptions, str]:
    """Combine positional paths and ``-o`` strings into options and a mount point."""
    opts = MountOptions()
    for text in args.options:
        parse_options(text, opts)
    paths = list(args.paths)
    if args.read_only:
        opts.read_only = True
    if args.userxattr:
        opts.userxattr = True
    if len(paths) == 4:
        opts.lowerdirs = parse_lowerdir(paths[0])
        opts.upperdir, opts.workdir = paths[1], paths[2]
    elif len(paths) == 2 and not opts.lowerdirs:
        # --read-only LOWER MERGED
        opts.lowerdirs = parse_lowerdir(paths[0])
        if opts.upperdir is None:
            opts.read_only = True
    elif len(paths) == 2:
        pass  # SOURCE MERGED, as mount.fuse3 passes it; SOURCE is only a label
    elif len(paths) != 1:
        raise UsageError(
            "expected LOWER UPPER WORK MERGED, --read-only LOWER MERGED, "
            "or -o lowerdir=...[,upperdir=...,workdir=...] MERGED"
        )
    if not opts.lowerdirs:
        raise UsageError("no lower layer given (LOWER or -o lowerdir=...)")
    if (opts.upperdir is None) != (opts.workdir is None):
        raise UsageError("upperdir and workdir go together")
    if opts.upperdir is None:
        opts.read_only = True
    return opts, paths[-1]


def cmd_mount(args: argparse.Namespace) -> int:
    from pyoverlay import super as overlay_super

    opts, mountpoint = mount_options_from_args(args)
    overlay_super.mount(
        opts, mountpoint, foreground=args.foreground, debug=args.debug, pid_file=args.pid_file
    )
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from pyoverlay import super as overlay_super

    overlay_super.unmount(args.mountpoint)
    return 0


def _normalise_argv(argv: list[str]) -> list[str]:
    """Accept the form mount.fuse3 and fstab use: ``pyoverlay SOURCE MERGED -o OPTS``."""
    if argv and argv[0] not in SUBCOMMANDS:
        return ["mount", *argv]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    argv = _normalise_argv(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.INFO, format="pyoverlay[%(process)d]: %(levelname)s %(message)s"
    )
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except UsageError as exc:
        _error_line(str(exc))
        return 2
    except PyoverlayError as exc:
        _error_line(str(exc))
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        _error_line(f"{exc.strerror or exc}{where}")
        return 1
    except KeyboardInterrupt:
        return 130


def _error_line(message: str) -> None:
    """Print one line, whatever the message quotes: control characters are escaped."""
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    print(f"pyoverlay: {safe}", file=sys.stderr)


if __name__ == "__main__":
    os._exit(main())
