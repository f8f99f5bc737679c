"""Layer sets for the read-view comparisons: builders plus what each must show.

Owns the on-disk fixtures. A layer set writes ``l0`` (top lower) .. ``lN`` and
optionally ``upper`` under a root directory, in one of two variants:

* ``"kernel"``: only formats kernel overlayfs reads (char 0/0 and xattr whiteouts,
  ``overlay.opaque`` = ``y``/``x``);
* ``"pyoverlay"``: the same tree, but where a set is about a format only fuse-overlayfs
  and OCI tools write (``.wh.NAME``, ``.wh..wh..opq``, ``user.fuseoverlayfs.opaque``),
  that format is used instead. Both variants must give identical merged views.

Times are fixed at the end of every build (derived from each relative path), so the two
variants and every ``cp -a`` copy carry the same mtimes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import zlib
from collections.abc import Callable
from pathlib import Path

Pathish = str | bytes
BASE_MTIME_NS = 1_600_000_000 * 10**9


def _b(path: Pathish) -> bytes:
    return path if isinstance(path, bytes) else path.encode()


class Builder:
    """Writes layer content under ``root``; paths are relative (``b"l0/dir/name"``)."""

    def __init__(self, root: Path, variant: str, prefix: str = "trusted.overlay.") -> None:
        self.root = os.fsencode(root)
        self.variant = variant
        self.prefix = prefix

    def p(self, rel: Pathish) -> bytes:
        return os.path.join(self.root, _b(rel))

    def _parent(self, rel: Pathish) -> bytes:
        parent = os.path.dirname(self.p(rel))
        os.makedirs(parent, exist_ok=True)
        return parent

    def _meta(
        self, path: bytes, mode: int, owner: tuple[int, int], xattrs: dict[str, bytes]
    ) -> None:
        os.chown(path, *owner, follow_symlinks=False)
        os.chmod(path, mode)  # after chown, which clears setuid/setgid bits
        for name, value in xattrs.items():
            os.setxattr(path, name, value, follow_symlinks=False)

    def file(
        self,
        rel: Pathish,
        data: bytes = b"",
        mode: int = 0o644,
        owner: tuple[int, int] = (0, 0),
        xattrs: dict[str, bytes] | None = None,
    ) -> None:
        self._parent(rel)
        with open(self.p(rel), "wb") as f:
            f.write(data)
        self._meta(self.p(rel), mode, owner, xattrs or {})

    def dir(
        self,
        rel: Pathish,
        mode: int = 0o755,
        owner: tuple[int, int] = (0, 0),
        xattrs: dict[str, bytes] | None = None,
    ) -> None:
        os.makedirs(self.p(rel), exist_ok=True)
        self._meta(self.p(rel), mode, owner, xattrs or {})

    def symlink(self, rel: Pathish, target: Pathish, owner: tuple[int, int] = (0, 0)) -> None:
        self._parent(rel)
        os.symlink(_b(target), self.p(rel))
        os.chown(self.p(rel), *owner, follow_symlinks=False)

    def node(
        self,
        rel: Pathish,
        kind: int,
        mode: int = 0o644,
        dev: int = 0,
        owner: tuple[int, int] = (0, 0),
    ) -> None:
        """A fifo, socket or device node (``kind`` is stat.S_IFIFO etc.)."""
        self._parent(rel)
        os.mknod(self.p(rel), kind | mode, dev)
        self._meta(self.p(rel), mode, owner, {})

    def hardlink(self, existing: Pathish, rel: Pathish) -> None:
        self._parent(rel)
        os.link(self.p(existing), self.p(rel))

    def whiteout(self, rel: Pathish, style: str = "chr") -> None:
        """Hide ``rel`` in the layers below: ``chr``, ``xattr`` or ``oci`` (``.wh.NAME``)."""
        parent = self._parent(rel)
        name = os.path.basename(_b(rel))
        if style == "oci" and self.variant == "kernel":
            style = "chr"
        if style == "chr":
            os.mknod(self.p(rel), stat.S_IFCHR | 0o600, os.makedev(0, 0))
        elif style == "xattr":
            with open(self.p(rel), "wb"):
                pass
            os.setxattr(self.p(rel), self.prefix + "whiteout", b"y")
            self._mark_xwhiteouts(parent)
        elif style == "oci":
            with open(os.path.join(parent, b".wh." + name), "wb"):
                pass
        else:
            raise ValueError(style)

    def _mark_xwhiteouts(self, parent: bytes) -> None:
        try:
            current = os.getxattr(parent, self.prefix + "opaque")
        except OSError:
            current = b""
        if current != b"y":  # an opaque dir hides everything below anyway
            os.setxattr(parent, self.prefix + "opaque", b"x")

    def opaque(self, rel: Pathish, style: str = "y") -> None:
        """Make the directory ``rel`` opaque.

        ``y`` (overlay.opaque in this set's namespace), ``fuseoverlayfs``
        (user.fuseoverlayfs.opaque), ``oci`` (``.wh..wh..opq``) or ``fuseoverlayfs+oci``.
        The last three become ``y`` in the kernel variant.
        """
        if not os.path.isdir(self.p(rel)):
            self.dir(rel)
        path = self.p(rel)
        if self.variant == "kernel" or style == "y":
            os.setxattr(path, self.prefix + "opaque", b"y")
            return
        if "fuseoverlayfs" in style:
            os.setxattr(path, "user.fuseoverlayfs.opaque", b"y")
        if "oci" in style:
            with open(os.path.join(path, b".wh..wh..opq"), "wb"):
                pass

    def freeze_times(self) -> None:
        """Give every object an mtime derived from its relative path (children first)."""
        for dirpath, dirnames, filenames in os.walk(self.root, topdown=False):
            for name in [*filenames, *dirnames]:
                self._stamp(os.path.join(dirpath, name))
        self._stamp(self.root)

    def _stamp(self, path: bytes) -> None:
        rel = os.path.relpath(path, self.root)
        t = BASE_MTIME_NS + zlib.crc32(rel) * 1_000_003
        os.utime(path, ns=(t, t), follow_symlinks=False)


def blob(seed: str, size: int) -> bytes:
    """Deterministic pseudo-random bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}/{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


TRUE_ELF = Path("/bin/true").read_bytes()
WEIRD_NAMES = (
    b"with space",
    b"new\nline",
    b"\xff\xfe not utf-8 \xe9",
    b"tab\there",
    b" leading",
    b"trailing ",
    b"-dash",
    b"x" * 255,
)


def mixed(b: Builder, layer: str, tag: str) -> None:
    """Every object type, odd names, modes, owners and xattrs, under ``layer``."""
    L = layer  # short on purpose: used in every line below
    b.dir(L)
    b.file(f"{L}/file_644", f"{tag} 644\n".encode())
    b.file(f"{L}/file_600_u1000", f"{tag} 600\n".encode(), 0o600, (1000, 1000))
    b.file(f"{L}/file_000", b"unreadable by mode\n", 0o000, (12345, 54321))
    b.file(f"{L}/setuid", b"#!/bin/sh\n", 0o4755)
    b.file(f"{L}/setgid", b"#!/bin/sh\n", 0o2750, (0, 65534))
    b.file(f"{L}/readonly", b"ro\n", 0o444, (65534, 65534))
    b.file(f"{L}/empty", b"")
    b.file(f"{L}/true_elf", TRUE_ELF, 0o755)  # a real binary: exec maps it from the mount
    b.file(f"{L}/big.bin", blob(tag, 300_000))
    b.file(
        f"{L}/xattrs",
        b"has xattrs\n",
        xattrs={
            "user.comment": tag.encode(),
            "user.empty": b"",
            "user.binary": bytes(range(256)),
            "trusted.pyoverlay-test": b"trusted but not ours",
            "user.big": blob("xattr" + tag, 3000),
            **{f"user.n{i:02d}": str(i).encode() for i in range(24)},
        },
    )
    b.dir(f"{L}/sticky", 0o1777)
    b.dir(f"{L}/private", 0o700, (1000, 1000), {"user.dirnote": b"d"})
    b.dir(f"{L}/noexec_dir", 0o644)
    b.file(f"{L}/noexec_dir/inside", b"x\n")
    b.file(f"{L}/private/secret", b"s\n", 0o600, (1000, 1000))
    b.symlink(f"{L}/rel_link", "file_644")
    b.symlink(f"{L}/up_link", "../outside")
    b.symlink(f"{L}/abs_link", "/etc/hostname")
    b.symlink(f"{L}/dangling", "nowhere/at/all", (1000, 1000))
    b.symlink(f"{L}/dir_link", "sticky")
    b.node(f"{L}/fifo", stat.S_IFIFO, 0o640)
    # Only trusted.* (not user.*) xattrs can sit on symlinks and special files.
    os.setxattr(b.p(f"{L}/abs_link"), "trusted.linknote", b"on a symlink", follow_symlinks=False)
    os.setxattr(b.p(f"{L}/fifo"), "trusted.fifonote", tag.encode())
    b.node(f"{L}/null_dev", stat.S_IFCHR, 0o666, os.makedev(1, 3))
    b.node(f"{L}/loop_dev", stat.S_IFBLK, 0o660, os.makedev(7, 0), (0, 6))
    b.node(f"{L}/socket", stat.S_IFSOCK, 0o755)
    b.file(f"{L}/hl_a", f"{tag} linked\n".encode(), 0o640, (1000, 100))
    b.hardlink(f"{L}/hl_a", f"{L}/hl_b")
    b.hardlink(f"{L}/hl_a", f"{L}/sticky/hl_c")
    for i, name in enumerate(WEIRD_NAMES):
        b.file(_b(f"{L}/names/") + name, f"{tag} weird {i}\n".encode())
    b.dir(_b(f"{L}/names/dir with\nnewline"))
    b.file(_b(f"{L}/names/dir with\nnewline/\xc3\xa9t\xc3\xa9"), b"utf-8 name\n")


# -- the layer sets ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerSet:
    """A named fixture: how to build it and what its merged view must show."""

    name: str
    lowers: int
    upper: bool
    build: Callable[[Builder], None]
    userxattr: bool = False
    #: True when the pyoverlay variant uses a format the kernel cannot read.
    variants: bool = False
    #: How to ask pyoverlay for the mount: "positional", "readonly" or "options".
    cli_form: str = "positional"
    present: tuple[bytes, ...] = ()
    absent: tuple[bytes, ...] = ()
    #: Contents the merged view must show for some files (top layer wins).
    contents: tuple[tuple[bytes, bytes], ...] = ()
    #: Directory names of the lowers, top first, when not ``l0``, ``l1``, ...
    lower_dirs: tuple[str, ...] = ()
    #: Mount read-only (option ``ro``) even though there is an upper layer.
    ro_flag: bool = False

    @property
    def prefix(self) -> str:
        return "user.overlay." if self.userxattr else "trusted.overlay."

    def lower_names(self) -> list[str]:
        return list(self.lower_dirs) or [f"l{i}" for i in range(self.lowers)]

    def make(self, root: Path, variant: str) -> Path:
        """Build this set's ``variant`` under ``root`` (created) and return ``root``."""
        root.mkdir(parents=True)
        b = Builder(root, variant, self.prefix)
        for name in [*self.lower_names(), *(["upper"] if self.upper else [])]:
            b.dir(name)
        self.build(b)
        b.freeze_times()
        return root


MIXED_PRESENT = (
    b"file_644",
    b"hl_a",
    b"socket",
    b"fifo",
    b"names/new\nline",
    b"names/\xff\xfe not utf-8 \xe9",
)


def build_ro_1(b: Builder) -> None:
    mixed(b, "l0", "only")


def build_rw_1(b: Builder) -> None:
    mixed(b, "l0", "lower")
    b.file("upper/file_644", b"upper wins\n", 0o640, (1000, 1000))
    b.whiteout("upper/hl_b")
    b.whiteout("upper/socket")
    b.whiteout("upper/names/with space")
    b.opaque("upper/private")
    b.file("upper/private/new", b"only in upper\n")
    b.file("upper/in_upper", b"I am from upper\n")
    b.file("upper/u_link1", b"linked in upper\n", 0o600, (1000, 1000))
    b.hardlink("upper/u_link1", "upper/private/u_link2")
    b.dir("upper/sticky", 0o1777)
    b.file("upper/sticky/added", b"merged in\n")


def build_ro_3(b: Builder) -> None:
    mixed(b, "l2", "bottom")
    b.file("l1/file_644", b"middle wins\n")
    b.whiteout("l1/fifo")
    b.whiteout("l1/names")  # a whole directory
    b.dir("l1/sticky", 0o755, (1000, 1000))  # merged dir takes the top copy's attrs
    b.file("l1/sticky/from_l1", b"1\n")
    b.opaque("l1/private")
    b.file("l1/private/l1_only", b"1\n")
    b.file("l0/sticky", b"a file hides the dir below\n")
    b.dir("l0/empty", 0o750)  # a dir hides the file below
    b.file("l0/empty/inside", b"0\n")
    b.file("l0/names/reborn", b"a dir above a whiteout starts fresh\n")
    b.whiteout("l2/orphan_whiteout")  # hides nothing, must not show either
    b.node("l1/chr_0_1", stat.S_IFCHR, 0o600, os.makedev(0, 1))  # a device, not a whiteout


def build_rw_3(b: Builder) -> None:
    """Every format the kernel reads, in upper and lowers."""
    for i in range(3):
        b.file(f"l2/d/f{i}", b"l2\n")
        b.file(f"l2/x/f{i}", b"l2\n")
        b.file(f"l2/o/f{i}", b"l2\n")
        b.file(f"l2/not_opaque/f{i}", b"l2\n")
    b.file("l2/d/f3", b"seen through the x-marked dir above\n")
    b.dir("l1/not_opaque", xattrs={"trusted.overlay.opaque": b"yes"})  # only "y" is opaque
    b.file("l1/not_opaque/l1", b"l1\n")
    b.file("l2/top_file", b"l2\n")
    b.file("l2/gone_dir/inner", b"l2\n")
    b.whiteout("l1/d/f0", "xattr")  # xattr whiteout in an opaque="x" dir
    b.file("l1/d/l1_file", b"l1\n")
    b.whiteout("l1/x/f1", "chr")
    b.whiteout("l1/x/f2", "xattr")  # both formats in one dir
    b.opaque("l1/o")
    b.file("l1/o/new", b"l1\n")
    b.whiteout("l0/top_file", "xattr")  # xattr whiteout in the layer root
    b.whiteout("l0/gone_dir", "xattr")
    b.file("l0/d/f1", b"l0 wins\n")
    b.whiteout("upper/d/f2", "chr")
    b.whiteout("upper/x/f0", "chr")
    b.opaque("upper/fresh")
    b.file("upper/fresh/u", b"u\n")
    b.file("l2/fresh/hidden", b"l2\n")
    b.file("upper/o/f9", b"upper\n")


def build_rw_6(b: Builder) -> None:
    mixed(b, "l5", "l5")
    for i in range(6):
        b.file(f"l{i}/stack", f"from l{i}\n".encode(), 0o600 + i, (i, i))
        b.file(f"l{i}/tower/own_{i}", f"{i}\n".encode())
        b.dir(f"l{i}/tower", 0o700 + 10 * i, (100 + i, 100 + i))
    b.file("upper/tower/own_u", b"u\n")
    # "flip" alternates between file and dir going up the stack.
    b.file("l5/flip", b"file at the bottom\n")
    b.file("l4/flip/in_dir_l4", b"4\n")
    b.file("l3/flip/in_dir_l3", b"3\n")
    b.file("l2/flip", b"file in l2\n")
    b.file("l1/flip/in_dir_l1", b"1\n")
    b.whiteout("l2/hl_a")
    b.file("l1/hl_a", b"recreated above a whiteout\n")
    b.opaque("l3/sticky")
    b.file("l3/sticky/l3", b"3\n")
    b.file("l0/sticky/l0", b"0\n")
    b.whiteout("upper/tower/own_3")
    b.file("l3/sym_vs_dir/under", b"3\n")
    b.symlink("l2/sym_vs_dir", "tower")  # a symlink hides the dir below


def build_userxattr(b: Builder) -> None:
    for i in range(3):
        b.file(f"l1/d/f{i}", b"l1\n")
        b.file(f"l1/o/f{i}", b"l1\n")
    b.file("l1/plain", b"l1\n")
    b.whiteout("l0/d/f0", "xattr")  # user.overlay.whiteout in user.overlay.opaque=x
    b.whiteout("l0/d/f1", "chr")
    b.opaque("l0/o")  # user.overlay.opaque=y
    b.file("l0/o/l0", b"l0\n")
    b.file("l0/plain", b"l0 wins\n", xattrs={"user.kept": b"visible"})
    b.whiteout("upper/d/f2", "chr")
    b.opaque("upper/uo")
    b.file("upper/uo/u", b"u\n")
    b.file("l1/uo/hidden", b"l1\n")


def build_oci(b: Builder) -> None:
    for i in range(3):
        b.file(f"l2/d/f{i}", b"l2\n")
        b.file(f"l2/o/f{i}", b"l2\n")
        b.file(f"l2/o2/f{i}", b"l2\n")
    b.file("l2/top", b"l2\n")
    b.file("l2/gone/inner", b"l2\n")
    b.whiteout("l1/d/f0", "oci")
    b.whiteout("l1/top", "oci")
    b.whiteout("l1/gone", "oci")
    b.opaque("l1/o", "oci")
    b.file("l1/o/l1", b"l1\n")
    b.file("l0/o2/l0", b"l0\n")
    b.opaque("l0/o2", "oci")
    b.file("l0/d/f1", b"l0 wins\n")
    if os.path.isdir(b.p("upper")):
        b.whiteout("upper/d/f2", "oci")
        b.opaque("upper/uo", "oci")
        b.file("upper/uo/u", b"u\n")
        b.file("l2/uo/hidden", b"l2\n")


def build_fuseoverlayfs(b: Builder) -> None:
    for style in ("fuseoverlayfs", "oci", "fuseoverlayfs+oci"):
        d = style.replace("+", "_")
        for i in range(2):
            b.file(f"l1/{d}/f{i}", b"l1\n")
            b.file(f"l1/u_{d}/f{i}", b"l1\n")
        b.opaque(f"l0/{d}", style)
        b.file(f"l0/{d}/l0", b"l0\n")
        b.opaque(f"upper/u_{d}", style)
        b.file(f"upper/u_{d}/u", b"u\n")


DEPTH = 40


def _chain(depth: int) -> str:
    return "/".join(f"d{i:02d}" for i in range(depth))


def build_deep(b: Builder) -> None:
    for i in range(DEPTH):
        b.file(f"l2/{_chain(i + 1)}/leaf_{i}", f"l2 {i}\n".encode())
    for i in range(25):
        b.file(f"l1/{_chain(i + 1)}/mid_{i}", f"l1 {i}\n".encode())
    b.whiteout(f"l1/{_chain(25)}/leaf_24")
    b.opaque(f"l0/{_chain(36)}")
    b.file(f"l0/{_chain(36)}/top", b"l0\n")
    b.file(f"upper/{_chain(DEPTH)}/new", b"upper\n")


BIG = 10_000


def build_bigdir(b: Builder) -> None:
    """10,000 visible entries merged from three layers, plus 100 whited out."""
    ranges = {"l2": range(0, 5000), "l1": range(4000, 8000), "l0": range(7000, BIG)}
    for layer, span in ranges.items():
        b.dir(f"{layer}/big")
        for i in span:
            _big_entry(b, layer, i)
    for i in range(100):
        b.file(f"l2/big/hidden_entry_{i:04d}", b"hidden\n")
        b.whiteout(f"l0/big/hidden_entry_{i:04d}", "chr" if i % 2 else "xattr")


def _big_entry(b: Builder, layer: str, i: int) -> None:
    rel = f"{layer}/big/entry_with_a_longish_name_{i:05d}"
    if i % 100 == 0:
        b.dir(rel)
    elif i % 37 == 0:
        b.symlink(rel, f"target_{i}")
    else:
        b.file(rel, f"{layer} {i}\n".encode())


def build_colon_names(b: Builder) -> None:
    """Layer directories whose names hold a colon, escaped as ``\\:`` in lowerdir."""
    b.file("bottom:layer/shared", b"bottom\n")
    b.file("bottom:layer/only_bottom", b"bottom\n")
    b.file("top:layer/shared", b"top\n")
    b.whiteout("top:layer/only_bottom")
    b.file("upper/in:upper", b"upper\n")


def _names(*paths: str) -> tuple[bytes, ...]:
    return tuple(p.encode() for p in paths)


LAYER_SETS = [
    LayerSet(
        "ro_1",
        1,
        False,
        build_ro_1,
        cli_form="readonly",
        present=MIXED_PRESENT,
    ),
    LayerSet(
        "rw_1",
        1,
        True,
        build_rw_1,
        present=(*_names("in_upper", "private/new", "sticky/added", "hl_a"), b"sticky/hl_c"),
        absent=_names("hl_b", "socket", "names/with space", "private/secret"),
        contents=((b"file_644", b"upper wins\n"),),
    ),
    LayerSet(
        "rw_1_ro_flag",
        1,
        True,
        build_rw_1,
        ro_flag=True,
        cli_form="options",
        present=(b"in_upper", b"sticky/added"),
        absent=(b"hl_b", b"private/secret"),
    ),
    LayerSet(
        "ro_3",
        3,
        False,
        build_ro_3,
        cli_form="options",
        present=_names("sticky", "empty/inside", "names/reborn", "private/l1_only", "chr_0_1"),
        absent=_names(
            "fifo", "names/with space", "private/secret", "sticky/from_l1", "orphan_whiteout"
        ),
        contents=((b"file_644", b"middle wins\n"),),
    ),
    LayerSet(
        "rw_3",
        3,
        True,
        build_rw_3,
        present=_names("d/l1_file", "d/f3", "o/new", "fresh/u", "o/f9", "not_opaque/f0"),
        absent=_names(
            "d/f0", "d/f2", "x/f0", "x/f1", "x/f2", "o/f0", "top_file", "gone_dir", "fresh/hidden"
        ),
        contents=((b"d/f1", b"l0 wins\n"),),
    ),
    LayerSet(
        "rw_6",
        6,
        True,
        build_rw_6,
        present=_names(
            "tower/own_0",
            "tower/own_5",
            "tower/own_u",
            "flip/in_dir_l1",
            "sticky/l0",
            "sticky/l3",
            "sym_vs_dir",
        ),
        absent=_names("tower/own_3", "flip/in_dir_l3", "sticky/hl_c", "flip/in_dir_l4"),
        contents=((b"stack", b"from l0\n"), (b"hl_a", b"recreated above a whiteout\n")),
    ),
    LayerSet(
        "userxattr",
        2,
        True,
        build_userxattr,
        userxattr=True,
        cli_form="options",
        present=_names("o/l0", "uo/u", "plain"),
        absent=_names("d/f0", "d/f1", "d/f2", "o/f0", "uo/hidden"),
        contents=((b"plain", b"l0 wins\n"),),
    ),
    LayerSet(
        "oci_rw",
        3,
        True,
        build_oci,
        variants=True,
        present=_names("o/l1", "o2/l0", "uo/u", "d/f1"),
        absent=_names("d/f0", "d/f2", "top", "gone", "o/f0", "o2/f0", "uo/hidden", ".wh.top"),
        contents=((b"d/f1", b"l0 wins\n"),),
    ),
    LayerSet(
        "oci_ro",
        3,
        False,
        build_oci,
        variants=True,
        cli_form="readonly",
        present=_names("o/l1", "o2/l0", "d/f1", "d/f2"),
        absent=_names("d/f0", "top", "gone", "o/f0", "o2/f1", "d/.wh.f0", "o/.wh..wh..opq"),
    ),
    LayerSet(
        "fuseoverlayfs",
        2,
        True,
        build_fuseoverlayfs,
        variants=True,
        present=_names("fuseoverlayfs/l0", "oci/l0", "fuseoverlayfs_oci/l0", "u_oci/u"),
        absent=_names("fuseoverlayfs/f0", "oci/f1", "fuseoverlayfs_oci/f0", "u_oci/f0"),
    ),
    LayerSet(
        "deep",
        3,
        True,
        build_deep,
        present=(
            f"{_chain(DEPTH)}/new".encode(),
            f"{_chain(36)}/top".encode(),
            f"{_chain(25)}/mid_24".encode(),
            f"{_chain(35)}/leaf_34".encode(),
        ),
        absent=(f"{_chain(25)}/leaf_24".encode(), f"{_chain(36)}/leaf_35".encode()),
    ),
    LayerSet(
        "bigdir",
        3,
        True,
        build_bigdir,
        present=(b"big/entry_with_a_longish_name_00000", b"big/entry_with_a_longish_name_09999"),
        absent=(b"big/hidden_entry_0000", b"big/hidden_entry_0099"),
        contents=(
            (b"big/entry_with_a_longish_name_04001", b"l1 4001\n"),
            (b"big/entry_with_a_longish_name_07001", b"l0 7001\n"),
        ),
    ),
    LayerSet(
        "colon_names",
        2,
        True,
        build_colon_names,
        lower_dirs=("top:layer", "bottom:layer"),
        present=_names("shared", "in:upper"),
        absent=_names("only_bottom"),
        contents=((b"shared", b"top\n"),),
    ),
]
BY_NAME = {s.name: s for s in LAYER_SETS}
