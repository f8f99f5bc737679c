"""Mount options: the kernel's ``-o`` syntax, ``\\:`` escapes, and FUSE generic options.

This is the counterpart of the kernel's ``fs/overlayfs/params.c``: it turns option
strings into a :class:`MountOptions` value and knows which options are ours, which are
FUSE's and which are harmless mount(8) flags to ignore.
"""

from __future__ import annotations

import dataclasses

from pyoverlay.errors import UsageError

#: Options mount(8) and mount.fuse3 pass along that change nothing for us.
IGNORED_OPTIONS = frozenset(
    {
        "rw",
        "atime",
        "noatime",
        "relatime",
        "norelatime",
        "strictatime",
        "nodiratime",
        "diratime",
        "async",
        "sync",
        "auto",
        "noauto",
        "user",
        "users",
        "nouser",
        "owner",
        "group",
        "nofail",
        "_netdev",
        "defaults",
        "lazytime",
        "nolazytime",
        "silent",
        "loud",
        "xino=off",
        "xino=auto",
        "xino=on",
        "index=off",
        "metacopy=off",
        "nfs_export=off",
        "uuid=off",
        "uuid=null",
        "uuid=auto",
        "uuid=on",
        "volatile",
        "squash_to_root",
        "squash_to_uid",
    }
)
#: FUSE options we pass to the kernel mount unchanged.
FUSE_FLAG_OPTIONS = frozenset(
    {
        "allow_other",
        "allow_root",
        "default_permissions",
        "auto_unmount",
        "dev",
        "nodev",
        "suid",
        "nosuid",
        "exec",
        "noexec",
    }
)
#: FUSE options that take a value and are passed through.
FUSE_VALUE_OPTIONS = frozenset({"fsname"})
#: fuse-overlayfs options we accept for compatibility and ignore.
IGNORED_VALUE_OPTIONS = frozenset(
    {
        "x-systemd.requires",
        "x-systemd.after",
        "comment",
        "context",
        "fscontext",
        "rootcontext",
        "defcontext",
        "squash_to_uid",
        "squash_to_gid",
        "uidmapping",
        "gidmapping",
        "plugins",
        "fsync",
        "threaded",
        "xattr_permissions",
        "static_nlink",
        "noacl",
        "uuid",
        "x-mount.mkdir",
    }
)


@dataclasses.dataclass
class MountOptions:
    """Everything that decides how one overlay is mounted."""

    lowerdirs: list[str] = dataclasses.field(default_factory=list)
    upperdir: str | None = None
    workdir: str | None = None
    userxattr: bool = False
    read_only: bool = False
    redirect_dir: bool = False
    #: "auto" (kernel caches on, with our own invalidation) or "none" (no kernel caching,
    #: for lower layers that change underneath).
    cache: str = "auto"
    #: Seconds the kernel may cache entries and attributes when ``cache`` is "auto".
    timeout: float = 300.0
    noatime: bool = False
    fuse_options: list[str] = dataclasses.field(default_factory=list)

    @property
    def writable(self) -> bool:
        return self.upperdir is not None and not self.read_only

    def xattr_prefix(self) -> str:
        """Namespace of the overlay's private xattrs that we write."""
        return "user.overlay." if self.userxattr else "trusted.overlay."


def split_escaped(text: str, sep: str, *, unescape: bool) -> list[str]:
    r"""Split on ``sep`` except where a backslash escapes it, as the kernel does.

    With ``unescape`` every ``\x`` becomes ``x`` (the final step for a path); without it
    the backslashes stay for a later split (the ``-o`` string before ``lowerdir=``).
    """
    parts: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            current.append(nxt if unescape else "\\" + nxt)
        elif ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_lowerdir(value: str) -> list[str]:
    r"""Parse ``l1:l2:l3`` (top layer first) with ``\:`` escapes."""
    if value.startswith("::") or "::" in value:
        raise UsageError(f"lowerdir={value!r}: data-only lower layers ('::') are not supported")
    layers = split_escaped(value, ":", unescape=True)
    if any(not layer for layer in layers):
        raise UsageError(f"lowerdir={value!r}: empty layer path")
    return layers


def _parse_redirect_dir(value: str) -> bool:
    """Whether renames of lower directories write redirects. Existing redirects are
    always followed: ``follow`` and ``off`` mean the same, as with the kernel's default
    redirect_always_follow, and ``nofollow`` (which the kernel wants with userxattr) is
    accepted but follows too."""
    if value == "on":
        return True
    if value in ("off", "follow", "nofollow"):
        return False
    raise UsageError(f"option redirect_dir={value!r}: expected on, off, follow or nofollow")


def apply_option(opts: MountOptions, item: str) -> None:
    """Apply one ``key[=value]`` option to ``opts``."""
    key, has_value, value = item.partition("=")
    if not key:
        return
    if key == "lowerdir":
        opts.lowerdirs = parse_lowerdir(value)
    elif key == "lowerdir+":
        opts.lowerdirs.append(value)
    elif key in ("upperdir", "workdir"):
        if not value:
            raise UsageError(f"option {key} needs a path")
        setattr(opts, key, value)
    elif key == "userxattr":
        opts.userxattr = True
    elif key == "ro":
        opts.read_only = True
    elif key == "redirect_dir":
        opts.redirect_dir = _parse_redirect_dir(value)
    elif key == "cache":
        if value not in ("auto", "none"):
            raise UsageError(f"option cache={value!r}: expected 'auto' or 'none'")
        opts.cache = value
    elif key == "timeout":
        opts.timeout = _parse_timeout(value)
    elif key == "noatime":
        opts.noatime = True
    elif key in FUSE_FLAG_OPTIONS and not has_value:
        opts.fuse_options.append(key)
    elif key in FUSE_VALUE_OPTIONS and has_value:
        opts.fuse_options.append(item)
    elif item in IGNORED_OPTIONS or key in IGNORED_VALUE_OPTIONS or key.startswith("x-"):
        pass
    else:
        raise UsageError(f"unknown mount option {item!r}")


def _parse_timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise UsageError(f"option timeout={value!r}: expected a number of seconds") from None
    if not 0 <= seconds <= 86400 * 365:
        raise UsageError(f"option timeout={value!r}: out of range")
    return seconds


def parse_options(text: str, opts: MountOptions | None = None) -> MountOptions:
    """Parse a comma-separated ``-o`` string into ``opts`` (a new one by default)."""
    opts = opts if opts is not None else MountOptions()
    for item in split_escaped(text, ",", unescape=False):
        apply_option(opts, item.strip())
    return opts
