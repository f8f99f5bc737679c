"""The write path of the overlay model on real layer directories, without FUSE.

Drives :class:`pyoverlay.overlay.Overlay` with ``pyoverlay.dir``, ``copy_up``, ``inode``
and ``xattrs`` directly and checks the upper directory the kernel's way: char 0/0
whiteouts, ``overlay.opaque``/``overlay.redirect`` xattrs, copy-up contents and metadata.
The integration tests compare the same behaviour against kernel overlayfs; these pin the
rules fast and point at the module that breaks.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from pyoverlay import dir as dirops
from pyoverlay import file as fileops
from pyoverlay import xattrs
from pyoverlay.copy_up import copy_up
from pyoverlay.inode import AttrChange, setattr
from pyoverlay.overlay import Overlay
from pyoverlay.params import MountOptions
from pyoverlay.util import RENAME_EXCHANGE, RENAME_NOREPLACE

OPAQUE = "trusted.overlay.opaque"
REDIRECT = "trusted.overlay.redirect"
OLD_NS = 1_500_000_000 * 10**9


class Layers:
    """Two lowers (``l0`` on top of ``l1``), ``upper`` and ``work`` under one root."""

    def __init__(self, root: Path):
        self.root = root
        for name in ("l0", "l1", "upper", "work"):
            (root / name).mkdir()

    def __truediv__(self, rel: str) -> Path:
        return self.root / rel

    def file(self, rel: str, data: bytes = b"x", mode: int = 0o644) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
        os.utime(path, ns=(OLD_NS, OLD_NS))
        return path

    def whiteout(self, rel: str, mode: int = 0) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(path, stat.S_IFCHR | mode, os.makedev(0, 0))

    def mount(self, **opts: object) -> Overlay:
        return Overlay(
            MountOptions(
                lowerdirs=[str(self.root / "l0"), str(self.root / "l1")],
                upperdir=str(self.root / "upper"),
                workdir=str(self.root / "work"),
                **opts,  # type: ignore[arg-type]
            )
        )


@pytest.fixture
def layers(tmp_path: Path) -> Layers:
    return Layers(tmp_path)


def is_whiteout(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def xattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as exc:
        assert exc.errno == errno.ENODATA
        return None


def errno_of(func, *args, **kwargs) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as info:
        func(*args, **kwargs)
    return info.value.errno


def work_is_empty(layers: Layers) -> bool:
    return os.listdir(layers / "work/work") == []


# -- copy-up ------------------------------------------------------------------------


def test_copy_up_copies_data_metadata_and_user_xattrs(layers: Layers) -> None:
    src = layers.file("l1/a/b/f", b"data" * 1000, 0o4750)
    os.chown(src, 1000, 100)
    src.chmod(0o4750)  # chown cleared setuid
    os.setxattr(src, "user.keep", b"1")
    os.setxattr(src, "trusted.overlay.origin", b"private")
    os.setxattr(src, "trusted.overlay.overlay.mine", b"escaped user data")
    os.utime(src, ns=(OLD_NS, OLD_NS))
    ov = layers.mount()
    copy_up(ov, b"a/b/f")
    up = layers / "upper/a/b/f"
    st = os.lstat(up)
    assert up.read_bytes() == b"data" * 1000
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4750, 1000, 100)
    assert st.st_mtime_ns == OLD_NS
    assert xattr(up, "user.keep") == b"1"
    assert xattr(up, "trusted.overlay.origin") is None
    assert xattr(up, "trusted.overlay.overlay.mine") == b"escaped user data"
    assert sorted(os.listdir(layers / "upper/a/b")) == ["f"]  # parents without contents
    assert work_is_empty(layers)


def test_copy_up_keeps_the_parents_times(layers: Layers) -> None:
    layers.file("l0/d/f")
    os.utime(layers / "l0/d", ns=(OLD_NS, OLD_NS))
    ov = layers.mount()
    copy_up(ov, b"d/f")
    assert os.stat(layers / "upper/d").st_mtime_ns == OLD_NS


def test_copy_up_keeps_holes(layers: Layers) -> None:
    path = layers / "l0/sparse"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
        f.write(b"head")
        f.seek((64 << 20) - 4)
        f.write(b"tail")
    ov = layers.mount()
    copy_up(ov, b"sparse")
    st = os.stat(layers / "upper/sparse")
    assert st.st_size == 64 << 20
    assert st.st_blocks * 512 < 1 << 20
    with open(layers / "upper/sparse", "rb") as f:
        assert f.read(4) == b"head"
        f.seek(-4, os.SEEK_END)
        assert f.read() == b"tail"


def test_copy_up_keeps_the_inode_number_but_breaks_lower_links(layers: Layers) -> None:
    layers.file("l0/single")
    layers.file("l0/hl_a")
    os.link(layers / "l0/hl_a", layers / "l0/hl_b")
    ov = layers.mount()
    before = ov.attributes(ov.lookup(b"single")).ino
    assert ov.attributes(copy_up(ov, b"single")).ino == before
    copy_up(ov, b"hl_a")
    assert os.lstat(layers / "upper/hl_a").st_nlink == 1
    assert not (layers / "upper/hl_b").exists()
    a, b = (ov.attributes(ov.lookup(n)) for n in (b"hl_a", b"hl_b"))
    assert a.ino != b.ino  # the copy is a new inode; hl_b still shows the lower one


def test_work_dir_leftovers_are_cleared_at_mount(layers: Layers) -> None:
    (layers / "work/work").mkdir()
    (layers / "work/work/#half-copied").write_bytes(b"partial")
    layers.mount()
    assert work_is_empty(layers)


# -- creating -----------------------------------------------------------------------


def test_create_in_a_lower_dir_copies_the_parent_chain(layers: Layers) -> None:
    layers.file("l1/p/q/existing")
    ov = layers.mount()
    dirops.create(ov, b"p/q/new", stat.S_IFREG | 0o640, dirops.Caller(5, 6))
    st = os.lstat(layers / "upper/p/q/new")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 5, 6)
    assert sorted(os.listdir(layers / "upper/p/q")) == ["new"]
    assert errno_of(dirops.create, ov, b"p/q/existing", stat.S_IFREG | 0o644) == errno.EEXIST


def test_setgid_directory_passes_on_its_group(layers: Layers) -> None:
    (layers / "l0/sg").mkdir()
    os.chown(layers / "l0/sg", 0, 100)
    (layers / "l0/sg").chmod(0o2777)
    ov = layers.mount()
    dirops.create(ov, b"sg/f", stat.S_IFREG | 0o644, dirops.Caller(1000, 1000))
    dirops.create(ov, b"sg/d", stat.S_IFDIR | 0o755, dirops.Caller(1000, 1000))
    f, d = os.lstat(layers / "upper/sg/f"), os.lstat(layers / "upper/sg/d")
    assert (f.st_uid, f.st_gid, d.st_gid) == (1000, 100, 100)
    assert d.st_mode & stat.S_ISGID and not f.st_mode & stat.S_ISGID


@pytest.mark.parametrize("kind", ["fifo", "chr", "sock", "symlink"])
def test_special_objects(layers: Layers, kind: str) -> None:
    ov = layers.mount()
    modes = {"fifo": stat.S_IFIFO, "chr": stat.S_IFCHR, "sock": stat.S_IFSOCK}
    if kind == "symlink":
        dirops.create(ov, b"obj", stat.S_IFLNK | 0o777, target=b"../x")
        assert os.readlink(layers / "upper/obj") == "../x"
    else:
        dirops.create(ov, b"obj", modes[kind] | 0o600, rdev=os.makedev(1, 5))
        st = os.lstat(layers / "upper/obj")
        assert stat.S_IFMT(st.st_mode) == modes[kind]
        if kind == "chr":
            assert st.st_rdev == os.makedev(1, 5)


def test_mkdir_over_a_whiteout_is_opaque(layers: Layers) -> None:
    layers.file("l0/x/inner")
    layers.whiteout("upper/x")
    ov = layers.mount()
    dirops.create(ov, b"x", stat.S_IFDIR | 0o755)
    assert xattr(layers / "upper/x", OPAQUE) == b"y"
    assert ov.lookup(b"x").layers[1:] == ()


def test_link_copies_up_then_links(layers: Layers) -> None:
    layers.file("l0/f", b"lower")
    ov = layers.mount()
    dirops.link(ov, b"f", b"g")
    assert os.lstat(layers / "upper/f").st_ino == os.lstat(layers / "upper/g").st_ino
    assert os.lstat(layers / "upper/f").st_nlink == 2
    assert errno_of(dirops.link, ov, b"f", b"g") == errno.EEXIST


def test_read_only_overlay_refuses_writes(layers: Layers) -> None:
    layers.file("l0/f")
    ov = Overlay(MountOptions(lowerdirs=[str(layers / "l0")], read_only=True))
    assert errno_of(dirops.create, ov, b"new", stat.S_IFREG | 0o644) == errno.EROFS
    assert errno_of(dirops.unlink, ov, b"f") == errno.EROFS


# -- removing -----------------------------------------------------------------------


def test_unlink_leaves_a_whiteout_only_over_lower_names(layers: Layers) -> None:
    layers.file("l1/lower")
    layers.file("upper/only_upper")
    ov = layers.mount()
    dirops.unlink(ov, b"lower")
    dirops.unlink(ov, b"only_upper")
    assert is_whiteout(layers / "upper/lower")
    assert not os.path.lexists(layers / "upper/only_upper")
    assert ov.resolve(b"lower") is None


def test_rmdir_of_merged_dir_needs_an_empty_view(layers: Layers) -> None:
    layers.file("l0/m/a")
    layers.file("l1/m/b")
    ov = layers.mount()
    assert errno_of(dirops.rmdir, ov, b"m") == errno.ENOTEMPTY
    dirops.unlink(ov, b"m/a")
    dirops.unlink(ov, b"m/b")
    dirops.rmdir(ov, b"m")
    assert is_whiteout(layers / "upper/m")
    assert work_is_empty(layers)


# -- renaming -----------------------------------------------------------------------


def test_rename_lower_dir_is_exdev_without_redirect_dir(layers: Layers) -> None:
    layers.file("l0/d/f")
    ov = layers.mount()
    assert errno_of(dirops.rename, ov, b"d", b"e") == errno.EXDEV


def test_redirects_are_written_as_the_kernel_does(layers: Layers) -> None:
    layers.file("l0/d/f")
    layers.file("l1/p/q/f")
    ov = layers.mount(redirect_dir=True)
    dirops.rename(ov, b"d", b"e")  # same parent: relative
    assert xattr(layers / "upper/e", REDIRECT) == b"d"
    dirops.rename(ov, b"e", b"e2")  # keeps its first relative redirect
    assert xattr(layers / "upper/e2", REDIRECT) == b"d"
    dirops.rename(ov, b"p/q", b"e2/q")  # another parent: absolute
    assert xattr(layers / "upper/e2/q", REDIRECT) == b"/p/q"
    assert ov.resolve(b"e2/f") is not None and ov.resolve(b"e2/q/f") is not None
    assert ov.resolve(b"d") is None and ov.resolve(b"p/q") is None


def test_renamed_upper_dir_is_opaque_in_a_merged_parent(layers: Layers) -> None:
    (layers / "upper/u").mkdir()
    layers.file("l0/other")
    ov = layers.mount()
    dirops.rename(ov, b"u", b"u2")  # same merged parent: still opaque, as the kernel
    assert xattr(layers / "upper/u2", OPAQUE) == b"y"


def test_rename_over_a_whiteout_reuses_it(layers: Layers) -> None:
    layers.file("l1/a")
    layers.file("l1/b")
    layers.whiteout("upper/b", 0o600)
    ov = layers.mount()
    dirops.rename(ov, b"a", b"b")
    assert (layers / "upper/b").read_bytes() == b"x"
    assert is_whiteout(layers / "upper/a")
    assert stat.S_IMODE(os.lstat(layers / "upper/a").st_mode) == 0o600


def test_rename_between_lower_hard_links_goes_ahead(layers: Layers) -> None:
    layers.file("l0/hl_a", b"linked")
    os.link(layers / "l0/hl_a", layers / "l0/hl_b")
    ov = layers.mount()
    dirops.rename(ov, b"hl_a", b"hl_b")
    assert ov.resolve(b"hl_a") is None
    assert is_whiteout(layers / "upper/hl_a")
    assert (layers / "upper/hl_b").read_bytes() == b"linked"


def test_rename_flags(layers: Layers) -> None:
    layers.file("l0/a", b"A")
    layers.file("l1/b", b"B")
    ov = layers.mount()
    assert errno_of(dirops.rename, ov, b"a", b"b", RENAME_NOREPLACE) == errno.EEXIST
    dirops.rename(ov, b"a", b"b", RENAME_EXCHANGE)
    assert (layers / "upper/a").read_bytes() == b"B"
    assert (layers / "upper/b").read_bytes() == b"A"
    assert errno_of(dirops.rename, ov, b"a", b"none", RENAME_EXCHANGE) == errno.ENOENT


# -- attributes and xattrs ----------------------------------------------------------


def test_setattr_copies_up_and_keeps_the_other_time(layers: Layers) -> None:
    layers.file("l0/f", b"0123456789")
    ov = layers.mount()
    setattr(ov, b"f", AttrChange(size=4, mtime_ns=7 * 10**9))
    st = os.lstat(layers / "upper/f")
    assert (st.st_size, st.st_mtime_ns, st.st_atime_ns) == (4, 7 * 10**9, OLD_NS)
    setattr(ov, b"f", AttrChange(mode=0o600, uid=3, gid=4))
    st = os.lstat(layers / "upper/f")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 3, 4)


def test_overlay_names_are_escaped(layers: Layers) -> None:
    layers.file("l0/f")
    (layers / "l0/d").mkdir()
    os.setxattr(layers / "l0/d", OPAQUE, b"y")
    ov = layers.mount()
    assert errno_of(xattrs.getxattr, ov, b"d", OPAQUE) == errno.ENODATA
    xattrs.setxattr(ov, b"f", "trusted.overlay.mine", b"v")
    assert xattr(layers / "upper/f", "trusted.overlay.overlay.mine") == b"v"
    assert xattr(layers / "upper/f", "trusted.overlay.mine") is None
    assert xattrs.getxattr(ov, b"f", "trusted.overlay.mine") == b"v"
    assert "trusted.overlay.mine" in xattrs.listxattr(ov, b"f")
    assert "trusted.overlay.mine" not in xattrs.listxattr(ov, b"f", privileged=False)
    xattrs.removexattr(ov, b"f", "trusted.overlay.mine")
    assert xattrs.listxattr(ov, b"f") == []
    assert errno_of(xattrs.setxattr, ov, b"f", "user.fuseoverlayfs.x", b"") == errno.EPERM


def test_removing_a_missing_xattr_copies_nothing_up(layers: Layers) -> None:
    layers.file("l0/f")
    ov = layers.mount()
    assert errno_of(xattrs.removexattr, ov, b"f", "user.none") == errno.ENODATA
    assert not os.path.lexists(layers / "upper/f")


def test_root_xattrs_are_the_upper_roots(layers: Layers) -> None:
    ov = layers.mount()
    xattrs.setxattr(ov, b"", "user.root", b"r")
    assert xattr(layers / "upper", "user.root") == b"r"
    assert xattrs.listxattr(ov, b"") == ["user.root"]


@pytest.mark.parametrize("access", [os.O_RDONLY, os.O_WRONLY])
def test_open_with_o_trunc_copies_up_and_truncates(layers: Layers, access: int) -> None:
    layers.file("l1/f", b"lower data")
    (layers / "upper/empty").write_bytes(b"")
    os.utime(layers / "upper/empty", ns=(OLD_NS, OLD_NS))
    ov = layers.mount()
    for name in (b"f", b"empty"):
        handle = fileops.open_file(ov, name, access | os.O_TRUNC)
        os.close(handle.fd)
        assert not handle.lower
    assert (layers / "upper/f").read_bytes() == b""
    st = os.lstat(layers / "upper/empty")
    assert st.st_mtime_ns > OLD_NS and st.st_atime_ns == OLD_NS  # open(2) sets mtime only
