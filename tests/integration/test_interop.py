"""On-disk interop: what one implementation writes, the other mounts and shows the same.

Kernel overlayfs runs a write sequence, is unmounted, and pyoverlay mounts that very
upper (and lowers): its merged tree must be exactly what the kernel showed before the
unmount. Then the other way round, and a chain kernel -> pyoverlay -> kernel. With
``redirect_dir=on`` the sequence also renames lower directories, so the reader must
follow the writer's ``trusted.overlay.redirect`` xattrs.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from oplog import (
    RENAME_EXCHANGE,
    Ctx,
    Mounted,
    Op,
    apply,
    build_write_set,
    copy_layers,
    forgive_xattr_block,
    kernel_mount,
    op,
    pyoverlay_mount_side,
)
from treeview import TreeView, diff_views, snapshot

pytestmark = pytest.mark.timeout(90)

#: Every operation here must succeed; together they leave every upper format behind.
WRITES = [
    op("create", "new", 0o640),
    op("write", "new", 0, b"fresh data"),
    op("write", "d/f0", 2, b"CHANGED"),
    op("truncate", "big", 5000),
    op("mknod", "n_fifo", "fifo", 0o600),
    op("mknod", "n_chr", "chr", 0o600, 1, 5),
    op("mkdir", "d/f2", 0o700),  # over a whiteout: opaque
    op("create", "d/f2/inside"),
    op("mkdir", "gone"),  # over a lower whiteout
    op("symlink", "d/f0", "new_link"),
    op("link", "hl_a", "hl_new"),
    op("unlink", "top"),
    op("unlink", "m/from1"),
    op("rmdir", "emptydir"),
    op("unlink", "ldir/y/z"),
    op("rmdir", "ldir/y"),
    op("rename", "d/l1file", "moved"),
    op("rename", "u_dir", "m/u_dir"),  # upper-only dir into a merged parent: opaque
    op("rename", "exec", "xat", RENAME_EXCHANGE),
    op("chmod", "ro", 0o640),
    op("chown", "suid", 1000, 100),
    op("utimens", "l1only/inner", 1_500_000_000 * 10**9, 1_400_000_000 * 10**9),
    op("setxattr", "d", "user.new", b"dir note"),
    op("setxattr", "m/from0", "trusted.overlay.mine", b"escaped"),
    op("removexattr", "exec", "user.a"),
]
REDIRECT_WRITES = [
    *WRITES,
    op("rename", "ldir", "ldir2"),  # relative redirect
    op("rename", "d/sub", "sub_top"),  # absolute redirect
    op("rename", "sub_top/deep", "m/deep2"),
    op("create", "m/deep2/new"),
    op("rename", "opq", "l1only", RENAME_EXCHANGE),
    op("mkdir", "ldir"),  # the old name again, now an opaque new dir
]


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_write_set(tmp_path_factory.mktemp("interop") / "src")


@contextlib.contextmanager
def mounted(kind: str, side: Mounted, redirect: bool) -> Iterator[Path]:
    if kind == "kernel":
        with kernel_mount(side, redirect) as m:
            yield m
    else:
        with pyoverlay_mount_side(side, redirect) as m:
            yield m


def view(kind: str, merged: Path) -> TreeView:
    if kind == "kernel":
        snapshot(merged)  # the kernel settles origin xattrs on its first walk
    return snapshot(merged)


def write(kind: str, side: Mounted, ops: list[Op], redirect: bool) -> TreeView:
    """Run ``ops`` on a ``kind`` mount of ``side``; its view before unmounting."""
    with mounted(kind, side, redirect) as merged:
        failed = [f"{o}: {r}" for o in ops if (r := apply(side.ctx, o)).status != "ok"]
        assert failed == [], f"{kind} refused writes the test relies on"
        return view(kind, merged)


def read(kind: str, side: Mounted, redirect: bool) -> TreeView:
    with mounted(kind, side, redirect) as merged:
        return view(kind, merged)


def compare(kernel_view: TreeView, py_view: TreeView) -> list[str]:
    diff = diff_views(kernel_view, forgive_xattr_block(kernel_view, py_view))
    extra = sorted(set(py_view.problems) - set(kernel_view.problems))
    return diff + [f"inode problem: {p}" for p in extra]


def side_for(src: Path, base: Path) -> Mounted:
    root = copy_layers(src, base / "layers")
    return Mounted("interop", root, Ctx(root / "merged", time.time_ns()))


@pytest.mark.parametrize("redirect", [False, True], ids=["redirect_off", "redirect_on"])
def test_pyoverlay_reads_what_kernel_wrote(src: Path, tmp_path: Path, redirect: bool) -> None:
    side = side_for(src, tmp_path)
    written = write("kernel", side, REDIRECT_WRITES if redirect else WRITES, redirect)
    seen = read("pyoverlay", side, redirect)
    found = compare(written, seen)
    assert found == [], "pyoverlay shows the kernel's upper differently:\n" + "\n".join(found)


@pytest.mark.parametrize("redirect", [False, True], ids=["redirect_off", "redirect_on"])
def test_kernel_reads_what_pyoverlay_wrote(src: Path, tmp_path: Path, redirect: bool) -> None:
    side = side_for(src, tmp_path)
    written = write("pyoverlay", side, REDIRECT_WRITES if redirect else WRITES, redirect)
    seen = read("kernel", side, redirect)
    found = compare(seen, written)
    assert found == [], "the kernel shows pyoverlay's upper differently:\n" + "\n".join(found)


def test_chain_kernel_pyoverlay_kernel(src: Path, tmp_path: Path) -> None:
    """Each writes on top of what the other left; every reader agrees with the writer."""
    side = side_for(src, tmp_path)
    first = write("kernel", side, WRITES[:12], redirect=True)
    assert compare(first, read("pyoverlay", side, True)) == []
    second = write("pyoverlay", side, WRITES[12:] + REDIRECT_WRITES[len(WRITES) :], True)
    found = compare(read("kernel", side, True), second)
    assert found == [], "\n".join(found)
    more = [op("rmdir", "ldir"), op("rename", "ldir2", "ldir"), op("unlink", "new")]
    third = write("kernel", side, more, redirect=True)
    found = compare(third, read("pyoverlay", side, True))
    assert found == [], "\n".join(found)
