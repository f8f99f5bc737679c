"""Write operations, one kind per test, on kernel overlayfs and pyoverlay side by side.

Each scenario runs the same operations on both mounts over identical copies of the write
layer set (oplog.build_write_set: three lowers plus upper) and asserts zero divergences:
per-operation result or errno, final merged tree, final upper directory, work directory.
Differences FUSE cannot avoid are pinned at the end of the module.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from oplog import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Op,
    apply,
    build_write_set,
    differential,
    op,
    pair,
)

pytestmark = pytest.mark.timeout(60)

NOREPLACE, EXCHANGE = RENAME_NOREPLACE, RENAME_EXCHANGE


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_write_set(tmp_path_factory.mktemp("writeset") / "src")


def assert_same(
    src: Path, base: Path, ops: list[Op], *, redirect: bool = False, userxattr: bool = False
) -> None:
    found = differential(src, base, ops, redirect=redirect, userxattr=userxattr)
    assert found == [], "pyoverlay diverges from kernel overlayfs:\n" + "\n".join(found)


def a(uid: int, gid: int, inner: Op, umask: int = 0o022) -> Op:
    """``inner`` run by ``uid``:``gid`` with ``umask``."""
    return op("as_user", uid, gid, umask, inner)


SCENARIOS: dict[str, list[Op]] = {
    "create": [
        op("create", "new", 0o640),
        op("new_stat", "new"),
        op("create", "new", 0o600),  # EEXIST
        op("create", "d/f0"),  # EEXIST on a lower file
        op("create", "d/f2", 0o600),  # over a whiteout in upper
        op("create", "d/sub/deep/new"),  # parent chain copied up
        op("create", "wh_target"),  # over a whiteout in a lower layer
        op("create", "gone/x"),  # parent whited out: ENOENT
        op("create", "top/x"),  # parent is a file: ENOTDIR
        op("create", "l1only/new", 0o4755),
        op("open_creat", "d/f0"),  # O_CREAT without O_EXCL on a lower file: no copy-up
        op("open_creat", "d/new_c"),
        op("new_stat", "l1only/new"),
        op("listdir", "d"),
        op("listdir", "d/sub/deep"),
    ],
    "mknod": [
        op("mknod", "n_fifo", "fifo", 0o600),
        op("mknod", "n_chr", "chr", 0o640, 1, 5),
        op("mknod", "n_blk", "blk", 0o600, 7, 3),
        op("mknod", "n_sock", "sock", 0o755),
        op("mknod", "d/f2", "fifo", 0o644),  # over a whiteout
        op("mknod", "fifo", "fifo", 0o644),  # EEXIST
        op("mknod", "ldir/y/n", "chr", 0o600, 4, 1),
        op("stat", "n_chr"),
        op("stat", "n_blk"),
        op("stat", "ldir/y/n"),
    ],
    "mkdir": [
        op("mkdir", "nd", 0o750),
        op("new_stat", "nd"),
        op("mkdir", "wh_target"),  # over a lower whiteout: opaque
        op("mkdir", "d/f2", 0o700),  # over an upper whiteout: opaque
        op("mkdir", "gone"),  # the whiteout hides a dir below: opaque, empty
        op("listdir", "gone"),
        op("mkdir", "d"),  # EEXIST
        op("mkdir", "ldir/y/new"),
        op("mkdir", "emptydir/x/y"),  # ENOENT
        op("mkdir", "top/x"),  # ENOTDIR
        op("create", "wh_target/inside"),
        op("listdir", "wh_target"),
    ],
    "symlink": [
        op("symlink", "d/f0", "s1"),
        op("readlink", "s1"),
        op("read", "s1"),
        op("symlink", "../../outside", "d/sub/s2"),
        op("symlink", "x", "sym"),  # EEXIST
        op("symlink", "a" * 200, "d/f2"),  # over a whiteout
        op("new_stat", "d/f2"),
        op("readlink", "sym"),
        op("readlink", "dangling"),
    ],
    "link": [
        op("stat", "hl_a"),
        op("stat", "hl_b"),
        op("link", "hl_a", "hl_new"),  # copy-up breaks the lower link
        op("stat", "hl_a"),
        op("stat", "hl_new"),
        op("stat", "hl_b"),
        op("write", "hl_new", 0, b"CHANGED"),
        op("read", "hl_a"),
        op("read", "hl_b"),
        op("link", "hl_b", "d/hl_c"),
        op("stat", "d/hl_c"),
        op("stat", "hl_b"),
        op("link", "d", "dlink"),  # EPERM
        op("link", "top", "u_file"),  # EEXIST
        op("link", "u_file", "d/sub/u2"),
        op("stat", "u_file"),
        op("link", "sym", "sym2"),
        op("link", "fifo", "d/f2"),  # over a whiteout
        op("link", "nothing", "x"),  # ENOENT
        op("unlink", "hl_a"),
        op("stat", "hl_new"),
    ],
    "lower_hard_links": [
        op("read", "hl_a"),  # fills the page cache of the inode both names share
        op("write", "hl_b", 5, b"\xef"),  # copy-up breaks the link
        op("read", "hl_a"),
        op("read", "hl_b"),
        op("stat", "hl_a"),
        op("stat", "hl_b"),
        op("append", "hl_a", b"more"),
        op("read", "hl_b"),
        op("read", "hl_a"),
    ],
    "unlink_rmdir": [
        op("unlink", "top"),
        op("unlink", "u_file"),
        op("unlink", "d/f0"),
        op("unlink", "d/f2"),  # already whited out: ENOENT
        op("unlink", "d"),  # EISDIR
        op("rmdir", "top"),  # ENOENT (gone now)
        op("rmdir", "exec"),  # ENOTDIR
        op("rmdir", "d"),  # merged, not empty
        op("rmdir", "emptydir"),
        op("rmdir", "u_empty"),
        op("rmdir", "uo"),  # ENOTEMPTY
        op("unlink", "uo/u"),
        op("rmdir", "uo"),
        op("unlink", "fifo"),
        op("unlink", "sym"),
        op("unlink", "hl_b"),
        op("stat", "hl_a"),
        op("unlink", "m/from0"),
        op("unlink", "m/from1"),
        op("unlink", "m/from2"),
        op("rmdir", "m"),  # ENOTEMPTY: from_u
        op("unlink", "m/from_u"),
        op("rmdir", "m"),
        op("listdir", ""),
        op("mkdir", "m"),
        op("listdir", "m"),
    ],
    "rename_files": [
        op("rename", "top", "top2"),
        op("rename", "d/f0", "d/f1"),  # over a lower file
        op("rename", "exec", "d/f2"),  # over an upper whiteout
        op("rename", "u_file", "m/from_u"),  # upper over upper
        op("rename", "sym", "wh_target"),  # over a lower whiteout
        op("rename", "fifo", "ldir/y/fifo"),
        op("rename", "chr", "chr"),  # to itself
        op("rename", "ro", "d"),  # EISDIR
        op("rename", "nothing", "x"),  # ENOENT
        op("rename", "xat", "big", NOREPLACE),  # EEXIST
        op("rename", "xat", "xat2", NOREPLACE),
        op("rename", "big", "top2", EXCHANGE),
        op("rename", "suid", "u_dir", EXCHANGE),  # file <-> upper dir
        op("rename", "blk", "nope", EXCHANGE),  # ENOENT
        op("rename", "d/l1file", "l1only/inner", EXCHANGE),
        op("rename", "sock", "d/sub/deep/leaf", NOREPLACE),  # EEXIST
        op("read", "top2"),
        op("read", "big"),
        op("listdir", "suid"),
        op("read", "l1only/inner"),
    ],
    "rename_dirs": [
        op("rename", "ldir", "ldir2"),  # lower dir: EXDEV
        op("rename", "d", "d2"),  # merged dir: EXDEV
        op("rename", "u_dir", "u_dir2"),  # upper-only: ok (and opaque in the merged root)
        op("rename", "u_dir2", "m/u3"),
        op("mkdir", "newdir"),
        op("create", "newdir/f"),
        op("rename", "newdir", "ldir/y/nd"),
        op("rename", "u_empty", "emptydir"),  # EXDEV: target is a lower dir
        op("rename", "m/u3", "d/sub/deep/x", NOREPLACE),
        op("rename", "m", "m/inner"),  # EINVAL
        op("rename", "uo", "ldir", EXCHANGE),  # EXDEV
        op("mkdir", "e1"),
        op("mkdir", "e2"),
        op("create", "e2/f"),
        op("rename", "e1", "e2"),  # ENOTEMPTY
        op("rename", "e2", "e1"),  # over an empty upper dir
        op("rename", "e1", "u_empty", EXCHANGE),
        op("rename", "e1", "top"),  # ENOTDIR
        op("listdir", "ldir/y/nd"),
        op("listdir", "u_empty"),
    ],
    "open_truncate": [
        op("open_r", "d/f0"),
        op("open_w", "d/f0"),
        op("open_rw", "l1only/inner"),
        op("open_trunc", "exec"),
        op("stat", "exec"),
        op("open_trunc", "sym"),  # follows to d/f0
        op("read", "d/f0"),
        op("truncate", "big", 1000),
        op("truncate", "xat", 70000),
        op("truncate", "d", 0),  # EISDIR
        op("truncate", "top", 0),
        op("read", "big"),
        op("read", "xat"),
        op("open_r_trunc", "m/from2"),  # Linux truncates even a read-only open
        op("truncate", "m/from0", 0),
        op("utimens", "m/from0", 10**9, 10**9),
        op("open_trunc", "m/from0"),  # an empty file still gets a new mtime
        op("stat", "m/from0"),
        op("open_w", "chr"),  # a device: no copy-up
        op("open_w", "ro"),  # root may open it
        op("open_w", "d"),  # EISDIR
        op("stat", "ro"),
    ],
    "attributes": [
        op("chmod", "d/f0", 0o4711),
        op("chmod", "d", 0o700),
        op("chmod", "sym", 0o600),  # the target, d/f0
        op("chmod", "fifo", 0o666),
        op("chown", "ro", 5, 6),
        op("chown", "sym", 7, 8),  # the link itself
        op("chown", "suid", 1, -1),  # clears setuid
        op("chown", "m", -1, 100),
        op("chown", "l1only/inner", 1000, 1000),
        op("utimens", "top", "now", "omit"),
        op("utimens", "exec", 1_000_000_000, "now"),
        op("utimens", "d/sub", 5_000_000_123, 6_000_000_456),
        op("utimens", "dangling", 1, 2),
        op("utimens", "ldir/x", "omit", "omit"),
        op("utimens", "ldir/y/z", "omit", 77),
        op("stat", "d/f0"),
        op("stat", "suid"),
        op("stat", "sym"),
        op("stat", "ldir/x"),
    ],
    "xattrs": [
        op("listxattr", "xat"),
        op("setxattr", "xat", "user.new", b"v"),
        op("removexattr", "xat", "user.a"),
        op("removexattr", "top", "user.none"),  # ENODATA, nothing copied up
        op("getxattr", "xat", "trusted.t"),
        op("setxattr", "d", "user.dir", b"dv"),
        op("removexattr", "d", "user.dx"),
        op("setxattr", "ldir/y", "user.y", b""),
        op("setxattr", "top", "trusted.overlay.opaque", b"y"),
        op("setxattr", "ldir", "trusted.overlay.redirect", b"/d"),
        op("getxattr", "uo", "trusted.overlay.opaque"),
        op("removexattr", "uo", "trusted.overlay.opaque"),
        op("setxattr", "exec", "trusted.mine", b"t"),
        op("setxattr", "sym", "user.s", b"1"),  # EPERM on a symlink
        op("setxattr", "xat", "user.b", b"x", os.XATTR_CREATE),  # EEXIST
        op("setxattr", "xat", "user.zz", b"x", os.XATTR_REPLACE),  # ENODATA
        op("getxattr", "top", "trusted.overlay.opaque"),  # escaped: the user's own value
        op("setxattr", "top", "trusted.overlay.overlay.x", b"double"),
        op("listxattr", "top"),
        op("removexattr", "top", "trusted.overlay.opaque"),
        op("listxattr", "xat"),
        op("listxattr", "uo"),
        op("listxattr", "d"),
        op("setxattr", "", "user.root", b"r"),  # the merged root
        op("getxattr", "", "user.root"),
        op("getxattr", "", "trusted.overlay.opaque"),
        op("listxattr", ""),
        a(1000, 1000, op("listxattr", "xat")),  # no trusted.* for a plain user
        a(1000, 1000, op("getxattr", "xat", "user.b")),
        op("link", "xat", "xat_link"),  # copy-up keeps escaped names
        op("setxattr", "ldir/x", "trusted.overlay.origin", b"forged"),
        op("rename", "ldir/x", "ldir/x2"),
        op("listxattr", "ldir/x2"),
    ],
    "data": [
        op("write", "d/f0", 3, b"XYZ"),
        op("append", "big", b"tail"),
        op("write", "l1only/inner", 100_000, b"far away"),  # leaves a hole
        op("fsync", "top"),
        op("fsync", "u_file", True),
        op("fsync", "d/l1file", True),
        op("fsyncdir", "m"),
        op("fsyncdir", "ldir"),
        op("create", "fresh"),
        op("write", "fresh", 0, b"x" * 200_000),
        op("read", "d/f0"),
        op("read", "big"),
        op("read", "l1only/inner"),
        op("stat", "l1only/inner"),
        op("ftruncate", "m/from2", 1),
        op("ftruncate", "u_file", 50_000),
        op("read_across_copy_up", "m/from0", b"NEW"),
        op("read_across_copy_up", "d/sub/deep/leaf", b"LEAF"),
        op("statfs"),
    ],
    "inode_numbers": [
        op("stat_ino", "d/f0"),
        op("stat_ino", "l1only/inner"),
        op("stat_ino", "ldir/y"),
        op("stat_ino", "hl_a"),
        op("stat_ino", "hl_b"),
        op("chmod", "d/f0", 0o600),
        op("write", "l1only/inner", 0, b"w"),
        op("create", "ldir/y/new"),
        op("stat_ino", "d/f0"),
        op("stat_ino", "l1only/inner"),
        op("stat_ino", "ldir/y"),
        op("stat", "hl_a"),
        op("link", "hl_a", "hl_c"),
        op("stat", "hl_a"),
        op("stat", "hl_b"),
        op("stat", "hl_c"),
        op("rename", "d/f0", "moved"),
        op("stat_ino", "moved"),
        op("rename", "l1only/inner", "l1only/inner2"),
        op("stat_ino", "l1only/inner2"),
    ],
    "privileges": [
        op("getxattr", "capfile", "security.capability"),
        op("chmod", "capfile", 0o750),  # copy-up keeps the capability
        op("getxattr", "capfile", "security.capability"),
        op("write", "capfile", 0, b"X"),  # a write drops it
        op("listxattr", "capfile"),
        a(1000, 1000, op("write", "suid_user", 0, b"#")),  # drops setuid and setgid
        op("stat", "suid_user"),
        op("chown", "suid", 0, 0),  # root's chown of a setuid file clears the bit
        op("stat", "suid"),
    ],
    "owners": [
        a(1000, 1000, op("create", "sgid/mine", 0o666)),
        a(1000, 1000, op("new_stat", "sgid/mine")),
        a(1000, 1000, op("mkdir", "sgid/sub", 0o777), umask=0o027),
        op("new_stat", "sgid/sub"),
        a(1000, 1000, op("create", "sgid/sub/deeper", 0o666), umask=0o077),
        op("new_stat", "sgid/sub/deeper"),
        a(1000, 1000, op("create", "d/nope")),  # EACCES: root's 0755 dir
        a(1000, 1000, op("unlink", "ro")),  # EACCES in the root
        a(1000, 1000, op("chmod", "ro", 0o644)),  # the owner may
        a(1000, 1000, op("chown", "ro", 1000, 100)),  # EPERM
        a(1000, 1000, op("write", "ro", 0, b"x")),  # EACCES: mode 0644 now
        a(1000, 1000, op("symlink", "t", "sgid/ln")),
        a(2000, 2000, op("mknod", "sgid/ff", "fifo", 0o666), umask=0),
        op("new_stat", "sgid/ff"),
        a(2000, 2000, op("unlink", "sgid/mine")),  # the dir is not sticky
        op("listdir", "sgid"),
    ],
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario(src: Path, tmp_path: Path, name: str) -> None:
    assert_same(src, tmp_path, SCENARIOS[name])


REDIRECT_SCENARIOS: dict[str, list[Op]] = {
    "chains": [
        op("rename", "d", "d2"),
        op("rename", "d2/sub", "d2/sub2"),  # inside a renamed dir
        op("rename", "d2/sub2/deep", "ldir/deep3"),
        op("rename", "ldir", "d"),  # onto the first one's old name
        op("listdir", "d"),
        op("listdir", "d/deep3"),
        op("rename", "d2", "ldir"),
        op("listdir", "ldir"),
        op("rename", "ldir/sub2", "m/sub4"),
        op("rmdir", "m/sub4"),
        op("rename", "m", "u_dir/m"),
        op("rename", "u_dir", "l1only/u"),  # an upper dir holding a redirected one
        op("listdir", "l1only/u/m"),
        op("rename", "l1only", "opq", EXCHANGE),
        op("listdir", "opq/u/m"),
        op("listdir", "l1only"),
        op("mkdir", "m"),
        op("rename", "opq/u/m", "m/back"),
        op("listdir", "m/back"),
        op("rename", "emptydir", "gone"),
        op("rmdir", "gone"),
        op("mkdir", "gone"),
        op("listdir", "gone"),
    ],
    "lower_dirs": [
        op("rename", "ldir", "ldir2"),
        op("listdir", "ldir2"),
        op("rename", "ldir2", "ldir3"),  # keeps its first (relative) redirect
        op("rename", "ldir3/y", "d/yy"),  # absolute redirect
        op("listdir", "d/yy"),
        op("mkdir", "ldir"),  # the old name, now opaque
        op("listdir", "ldir"),
        op("rename", "d/sub", "sub_top"),
        op("rename", "sub_top/deep", "d/deep2"),
        op("create", "d/deep2/new"),
        op("listdir", "d/deep2"),
        op("rmdir", "d/yy"),  # ENOTEMPTY
        op("unlink", "d/yy/z"),
        op("rmdir", "d/yy"),
        op("rename", "l1only", "gone"),  # over a whiteout
        op("listdir", "gone"),
    ],
    "merged_dirs": [
        op("rename", "m", "u_dir/m2"),
        op("listdir", "u_dir/m2"),
        op("rename", "u_dir", "udir3"),
        op("listdir", "udir3/m2"),
        op("rename", "d", "dd"),
        op("stat_ino", "dd"),
        op("rename", "dd", "d"),  # back home
        op("stat_ino", "d"),
        op("listdir", "d"),
        op("rename", "opq", "emptydir", EXCHANGE),
        op("listdir", "emptydir"),
        op("listdir", "opq"),
        op("rename", "uo", "ldir/uo", NOREPLACE),
        op("listdir", "ldir/uo"),
        op("rename", "ldir", "u_empty"),  # over an empty upper dir
        op("listdir", "u_empty"),
    ],
}


USERXATTR_OPS = [
    op("mkdir", "d/f2"),  # over a whiteout: user.overlay.opaque
    op("unlink", "top"),
    op("rmdir", "emptydir"),
    op("rename", "u_dir", "u2"),  # opaque in the merged root
    op("rename", "ldir", "ldir2"),  # EXDEV: no redirects with userxattr
    op("setxattr", "exec", "user.overlay.mine", b"escaped"),
    op("getxattr", "exec", "user.overlay.mine"),
    op("listxattr", "exec"),
    op("getxattr", "uo", "user.overlay.opaque"),
    op("setxattr", "xat", "trusted.overlay.x", b"t"),  # pinned below, not run here
]


def test_userxattr_mount(tmp_path: Path) -> None:
    """``-o userxattr`` on both sides: markers in user.overlay.*, same upper."""
    src = build_write_set(tmp_path / "src", "user.overlay.")
    assert_same(src, tmp_path, USERXATTR_OPS[:-1], userxattr=True)


@pytest.mark.parametrize("name", sorted(REDIRECT_SCENARIOS))
def test_redirect_dir_on(src: Path, tmp_path: Path, name: str) -> None:
    """Directory renames with redirect_dir=on on both sides: trees and upper xattrs match."""
    assert_same(src, tmp_path, REDIRECT_SCENARIOS[name], redirect=True)


# -- differences FUSE cannot avoid, pinned ------------------------------------------


def test_fallocate_is_refused_by_fuse(src: Path, tmp_path: Path) -> None:
    """pyfuse3 has no fallocate handler: the FUSE kernel answers EOPNOTSUPP.

    The file is still copied up by the open for writing, so the trees stay the same.
    """
    with pair(src, tmp_path) as p:
        k, py = p.step(op("fallocate", "d/f0", 0, 8192))
        assert k.status == "ok" and k.value == 8192
        assert (py.status, py.value) == ("err", errno.errorcode[errno.EOPNOTSUPP])
        p.divergences.clear()
        p.step(op("truncate", "d/f0", 8192))  # the same visible effect on both
        assert p.finish() == []


def test_one_st_dev_for_every_object(src: Path, tmp_path: Path) -> None:
    """FUSE reports one st_dev for the mount, as the kernel does with all layers on one
    filesystem: directories, lower, copied-up and new files all agree."""
    with pair(src, tmp_path) as p:
        for side in (p.kernel, p.py):
            apply(side.ctx, op("chmod", "d/f0", 0o600))
            apply(side.ctx, op("create", "new"))
            devs = {
                os.lstat(side.merged / name).st_dev
                for name in ("", "d", "d/f0", "new", "top", "u_file", "fifo")
            }
            assert len(devs) == 1, side.name
        p_dev = os.lstat(p.py.merged).st_dev
        k_dev = os.lstat(p.kernel.merged).st_dev
        assert p_dev != k_dev  # two mounts, two devices: only the value differs


def test_whiteouts_are_char_0_0_in_upper(src: Path, tmp_path: Path) -> None:
    """A direct look at pyoverlay's upper format (the differential tests compare it too)."""
    with pair(src, tmp_path) as p:
        for side in (p.kernel, p.py):
            apply(side.ctx, op("unlink", "top"))
            apply(side.ctx, op("mkdir", "d/f2"))  # over the upper's whiteout
        p.unmount()
        for side in (p.kernel, p.py):
            st = os.lstat(side.upper / "top")
            assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, side.name
            opaque = os.getxattr(side.upper / "d/f2", "trusted.overlay.opaque")
            assert opaque == b"y", side.name


def test_rename_between_lower_hard_links(src: Path, tmp_path: Path) -> None:
    """Two names of one multiply-linked lower file: the kernel (index=off) gives each its
    own overlay inode, so rename(hl_a, hl_b) copies up and replaces hl_b. pyfuse3 makes
    st_ino the FUSE node id, and both names report the lower st_ino as the kernel does,
    so the VFS sees one inode and rename(2) returns 0 without asking the daemon."""
    with pair(src, tmp_path) as p:
        k, py = p.step(op("rename", "hl_a", "hl_b"))
        assert k == py and k.status == "ok"
        assert not os.path.lexists(p.kernel.merged / "hl_a")
        assert os.path.lexists(p.py.merged / "hl_a")  # pinned: nothing happened
        assert os.lstat(p.py.merged / "hl_b").st_nlink == 2
        p.unmount()
        assert not os.path.lexists(p.py.upper / "hl_a")
        assert os.path.lexists(p.kernel.upper / "hl_a")  # the kernel's whiteout


def test_other_overlay_namespace_is_refused(src: Path, tmp_path: Path) -> None:
    """pyoverlay reads ``user.overlay.*`` markers in every mode (layers written by rootless
    tools), so it refuses users' ``user.overlay.*`` names without ``userxattr`` (the
    kernel passes them through there), and ``trusted.overlay.*`` ones with it."""
    with pair(src, tmp_path) as p:
        k, py = p.step(op("setxattr", "top", "user.overlay.opaque", b"y"))
        assert k.status == "ok"
        assert (py.status, py.value) == ("err", "EPERM")
    ux_src = build_write_set(tmp_path / "ux_src", "user.overlay.")
    (tmp_path / "ux").mkdir()
    with pair(ux_src, tmp_path / "ux", userxattr=True) as p:
        k, py = p.step(USERXATTR_OPS[-1])
        assert k.status == "ok"
        assert (py.status, py.value) == ("err", "EPERM")


def test_readlink_sets_lower_symlink_atime(src: Path, tmp_path: Path) -> None:
    """readlink(2) updates a symlink's atime (relatime) and no flag prevents it: the
    daemon reading a lower symlink touches the lower layer's atime, which the kernel
    never does. Only the atime of symlinks is affected (files and directories are
    opened with O_NOATIME)."""
    with pair(src, tmp_path) as p:
        before = {s.name: os.lstat(s.root / "l2/sym").st_atime_ns for s in (p.kernel, p.py)}
        for side in (p.kernel, p.py):
            assert os.readlink(side.merged / "sym") == "d/f0"
            os.lstat(side.merged / "d/f0")
        after = {s.name: os.lstat(s.root / "l2/sym").st_atime_ns for s in (p.kernel, p.py)}
        assert after["kernel"] == before["kernel"]
        assert after["pyoverlay"] > before["pyoverlay"]  # pinned: the lower atime moved
        f0 = {s.name: os.lstat(s.root / "l0/d/f1").st_atime_ns for s in (p.kernel, p.py)}
        for side in (p.kernel, p.py):
            apply(side.ctx, op("read", "d/f1"))
        assert f0 == {s.name: os.lstat(s.root / "l0/d/f1").st_atime_ns for s in (p.kernel, p.py)}


def test_shared_writable_mmap_of_a_lower_hard_link(src: Path, tmp_path: Path) -> None:
    """A write-open of a multiply-linked lower file uses FUSE direct I/O (so data written
    through one name never shows through the page cache the names share), and FUSE
    refuses MAP_SHARED for direct I/O: ENODEV where the kernel maps the copied-up file.
    Read-only and private mappings, and every other file, map as usual."""
    with pair(src, tmp_path) as p:
        got = {}
        for side in (p.kernel, p.py):
            fd = os.open(side.merged / "hl_a", os.O_RDWR)
            try:
                with mmap.mmap(fd, 0, mmap.MAP_SHARED) as m:
                    m[0:3] = b"MAP"
                got[side.name] = "ok"
            except OSError as exc:
                got[side.name] = errno.errorcode[exc.errno]
            finally:
                os.close(fd)
            fd = os.open(side.merged / "big", os.O_RDWR)  # a lower file with one name
            try:
                with mmap.mmap(fd, 0, mmap.MAP_SHARED) as m:
                    m[0:3] = b"MAP"
            finally:
                os.close(fd)
        assert got == {"kernel": "ok", "pyoverlay": "ENODEV"}
        p.divergences.clear()
        p.step(op("write", "hl_a", 0, b"MAP"))  # the kernel side has this already
        p.step(op("read", "hl_a"))
        assert p.finish() == []
