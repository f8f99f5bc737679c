"""Hostile layers cannot make pyoverlay see or touch anything outside the layer roots.

The layers hold absolute, relative and ``..`` symlinks, symlinks in one layer where a
layer above holds a directory of the same name (at the top and deeper down), symlinked
parents and redirects that try to climb out. Next to them lies an ``outside`` tree whose
files have names and inodes nothing inside the layers has. Each check runs with the C
helper and with the Python reference:

* through the model: every path resolved and listed, every layer copy of every result
  stat'ed, hostile paths (``..``, ``link/name``) resolved; nothing maps to an outside
  inode, and inotify sees no open, read or write under ``outside``;
* through a real mount (``python -m pyoverlay mount -f``) next to a kernel overlayfs
  mount of identical copies: the same tree, the same results after the same writes, and
  no inotify event under ``outside`` while the client works on the merged tree.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyoverlay import native, readdir
from pyoverlay.namei import Resolved
from pyoverlay.overlay import Overlay
from pyoverlay.params import MountOptions

sys.path.insert(0, str(Path(__file__).parent / "integration"))
from mounts import kernel_overlay, pyoverlay_mount
from treeview import TreeView, diff_views, snapshot

OUTSIDE_NAMES = ("SECRET_OUTSIDE", "sub_outside", "deep_secret")
IMPLEMENTATIONS = ["native", "python"]
HOSTILE_PATHS = (
    b"..",
    b"../outside",
    b"etc/..",
    b"etc/../..",
    b"etc/../../outside/SECRET_OUTSIDE",
    b"abs/SECRET_OUTSIDE",
    b"rel/SECRET_OUTSIDE",
    b"up/tmp",
    b"deep/x/deep_secret",
    b"chain/inner/SECRET_OUTSIDE",
    b"shadow/SECRET_OUTSIDE",
    b"mixed/sub_outside",
    b"redir/SECRET_OUTSIDE",
    b"relredir/SECRET_OUTSIDE",
)


# -- the hostile tree ------------------------------------------------------------------


def make_outside(path: Path) -> None:
    (path / "sub_outside").mkdir(parents=True)
    (path / "SECRET_OUTSIDE").write_text("must never be read\n")
    (path / "sub_outside" / "deep_secret").write_text("nor this\n")
    (path / "sub_outside" / "passwd_fake").write_text("outside twin of a layer file\n")


def build_hostile(side: Path, shared_outside: Path, *, redirects: bool) -> list[Path]:
    """Layers l0 (top) .. l2 and an ``outside`` tree under ``side``; returns the layers.

    Relative links climb from the layer to ``side/outside``; absolute ones point at
    ``shared_outside`` (the same for every copy of the set).
    """
    make_outside(side / "outside")
    l0, l1, l2 = (side / "layers" / f"l{i}" for i in range(3))
    for layer in (l0, l1, l2):
        layer.mkdir(parents=True)
    # bottom: links out of the layer in every form
    (l2 / "etc").symlink_to("../../outside")
    (l2 / "abs").symlink_to(shared_outside)
    (l2 / "rel").symlink_to("../../outside")
    (l2 / "up").symlink_to("../../../../../../../../..")
    (l2 / "shadow").symlink_to(shared_outside)
    (l2 / "chain").mkdir()
    (l2 / "chain" / "inner").symlink_to("../../../outside")
    (l2 / "plain").mkdir()
    (l2 / "plain" / "file").write_text("l2\n")
    # middle: directories over the links below, and links under directories above
    (l1 / "etc").mkdir()
    (l1 / "etc" / "passwd_fake").write_text("inside\n")
    (l1 / "shadow").mkdir()
    (l1 / "shadow" / "mine").write_text("l1\n")
    (l1 / "mixed").symlink_to(shared_outside)
    (l1 / "deep").mkdir()
    (l1 / "deep" / "x").symlink_to(shared_outside / "sub_outside")
    (l1 / "plain").symlink_to("../../outside")  # a link above a directory hides it
    # top: directories over links deeper down
    (l0 / "mixed").mkdir()
    (l0 / "mixed" / "m0").write_text("l0\n")
    (l0 / "deep" / "x").mkdir(parents=True)
    (l0 / "deep" / "x" / "own").write_text("l0\n")
    (l0 / "etc").mkdir()
    (l0 / "etc" / "hosts").write_text("l0\n")
    if redirects:  # the kernel refuses these outright; only the model sees them
        (l0 / "redir").mkdir()
        os.setxattr(l0 / "redir", "trusted.overlay.redirect", b"/../../outside")
        (l0 / "relredir").mkdir()
        os.setxattr(l0 / "relredir", "trusted.overlay.redirect", b"../outside")
    return [l0, l1, l2]


def outside_inodes(*roots: Path) -> set[tuple[int, int]]:
    found = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [".", *dirnames, *filenames]:
                st = os.lstat(os.path.join(dirpath, name))
                found.add((st.st_dev, st.st_ino))
    return found


# -- inotify: did anything open, read or change the outside tree? ----------------------

IN_ALL_EVENTS = 0xFFF
IN_CLOSE_NOWRITE = 0x10
IN_OPEN = 0x20
IN_ISDIR = 0x40000000


class Watcher:
    """inotify watches on every directory of some trees; ``events()`` drains them."""

    def __init__(self, *roots: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._paths: dict[int, str] = {}
        dirs = [dirpath for root in roots for dirpath, _, _ in os.walk(root)]
        for dirpath in dirs:
            wd = self._libc.inotify_add_watch(self.fd, os.fsencode(dirpath), IN_ALL_EVENTS)
            if wd < 0:
                raise OSError(ctypes.get_errno(), "inotify_add_watch", dirpath)
            self._paths[wd] = dirpath

    def events(self) -> list[str]:
        out = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            pos = 0
            while pos < len(data):
                wd, mask, _cookie, length = (int.from_bytes(data[pos + i : pos + i + 4], "little")
                                             for i in (0, 4, 8, 12))  # fmt: skip
                name = data[pos + 16 : pos + 16 + length].rstrip(b"\0").decode(errors="replace")
                out.append(f"{self._paths.get(wd, '?')}/{name} mask={mask:#x}")
                pos += 16 + length

    def close(self) -> None:
        os.close(self.fd)


@contextlib.contextmanager
def watching(*roots: Path) -> Iterator[Watcher]:
    watcher = Watcher(*roots)
    try:
        yield watcher
    finally:
        watcher.close()


@contextlib.contextmanager
def implementation(name: str) -> Iterator[None]:
    old = native.set_active(name == "native")
    try:
        yield
    finally:
        native.set_active(old)


def test_the_watcher_sees_an_open(tmp_path: Path) -> None:
    """The inotify check can fail: reading an outside file is noticed."""
    make_outside(tmp_path / "outside")
    with watching(tmp_path / "outside") as w:
        assert w.events() == []
        (tmp_path / "outside" / "sub_outside" / "deep_secret").read_text()
        os.listdir(tmp_path / "outside")
        assert len(w.events()) >= 2


# -- through the model -----------------------------------------------------------------


def walk_model(ov: Overlay) -> dict[bytes, Resolved]:
    """Every visible path, resolved, found by listing directories from the root."""
    seen: dict[bytes, Resolved] = {}
    pending = [b""]
    while pending:
        path = pending.pop()
        res = ov.lookup(path)
        seen[path] = res
        if res.is_dir:
            for name in readdir.merged_names(ov.stack, res):
                pending.append(path + b"/" + name if path else name)
    return seen


def copies_inside(ov: Overlay, res: Resolved, outside: set[tuple[int, int]]) -> list[str]:
    """Every layer copy of ``res``, stat'ed the way the overlay reaches it."""
    bad = []
    for layer, relpath in res.layers:
        parent, _, name = relpath.rpartition(b"/")
        if not name:
            continue
        st = os.stat(name, dir_fd=ov.stack.dir_fd(layer, parent), follow_symlinks=False)
        if (st.st_dev, st.st_ino) in outside:
            bad.append(f"{res.path!r} in {layer.path}: an outside inode")
    st = ov.stat_of(res)
    if (st.st_dev, st.st_ino) in outside:
        bad.append(f"{res.path!r}: stat shows an outside inode")
    return bad


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_model_never_leaves_the_layers(tmp_path: Path, impl: str) -> None:
    shared = tmp_path / "shared_outside"
    make_outside(shared)
    layers = build_hostile(tmp_path / "side", shared, redirects=True)
    outside = outside_inodes(shared, tmp_path / "side" / "outside")
    ov = Overlay(MountOptions(lowerdirs=[str(p) for p in layers], read_only=True))
    try:
        with implementation(impl), watching(shared, tmp_path / "side" / "outside") as w:
            view = walk_model(ov)
            problems = [p for res in view.values() for p in copies_inside(ov, res, outside)]
            hostile = {p: ov.resolve(p) for p in HOSTILE_PATHS}
            events = w.events()
        assert problems == []
        assert events == []
        assert {p: r for p, r in hostile.items() if r is not None} == {}
        names = {os.path.basename(p) for p in view}
        assert names.isdisjoint(n.encode() for n in OUTSIDE_NAMES)
        # what the rules say the merged tree holds
        assert set(readdir.merged_names(ov.stack, view[b"etc"])) == {b"hosts", b"passwd_fake"}
        assert set(readdir.merged_names(ov.stack, view[b"mixed"])) == {b"m0"}
        assert set(readdir.merged_names(ov.stack, view[b"deep/x"])) == {b"own"}
        assert set(readdir.merged_names(ov.stack, view[b"shadow"])) == {b"mine"}
        assert not view[b"abs"].is_dir and not view[b"plain"].is_dir
    finally:
        ov.close()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_model_matches_kernel_on_hostile_layers(tmp_path: Path, impl: str) -> None:
    """The model's tree (names, types, link targets) equals kernel overlayfs's."""
    shared = tmp_path / "shared_outside"
    make_outside(shared)
    layers = build_hostile(tmp_path / "side", shared, redirects=False)
    merged = tmp_path / "merged"
    merged.mkdir()
    ov = Overlay(MountOptions(lowerdirs=[str(p) for p in layers], read_only=True))
    try:
        with implementation(impl):
            model = {p: _model_kind(ov, r) for p, r in walk_model(ov).items()}
        with kernel_overlay(layers, None, None, merged):
            kernel = _kernel_tree(merged)
    finally:
        ov.close()
    assert model == kernel


def _model_kind(ov: Overlay, res: Resolved) -> str:
    if res.is_dir:
        return "dir"
    layer, relpath = res.top
    parent, _, name = relpath.rpartition(b"/")
    fd = ov.stack.dir_fd(layer, parent)
    if stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
        return "link:" + os.fsdecode(os.readlink(name, dir_fd=fd))
    return "file"


def _kernel_tree(merged: Path) -> dict[bytes, str]:
    out: dict[bytes, str] = {b"": "dir"}
    base = os.fsencode(merged)
    for dirpath, dirnames, filenames in os.walk(base):
        rel = os.path.relpath(dirpath, base)
        for name in dirnames + filenames:
            path = name if rel == b"." else os.path.join(rel, name)
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                out[path] = "link:" + os.fsdecode(os.readlink(full))
            else:
                out[path] = "dir" if os.path.isdir(full) else "file"
    return out


# -- through a real mount ----------------------------------------------------------------

#: Client operations on the merged tree; none goes through a symlink.
CLIENT_SCRIPT = r"""
set -e
cd "$1"
ls -laR . > /dev/null
cat etc/passwd_fake etc/hosts shadow/mine mixed/m0 deep/x/own > /dev/null
echo new > shadow/created
echo more >> etc/passwd_fake
mkdir mixed/sub && echo x > mixed/sub/f
mv deep/x/own deep/x/moved
rm etc/hosts
touch plain.new
stat -c '%n %F' abs rel up etc shadow mixed deep/x > /dev/null
ls -laR . > /dev/null
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_mount_never_leaves_the_layers(
    tmp_path: Path, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared_outside"
    make_outside(shared)
    src = tmp_path / "src"
    build_hostile(src, shared, redirects=False)
    sides = {}
    for name in ("kernel", "pyoverlay"):
        subprocess.run(["cp", "-a", "--", str(src), str(tmp_path / name)], check=True)
        for sub in ("upper", "work", "mnt/merged"):
            (tmp_path / name / sub).mkdir(parents=True)
        sides[name] = tmp_path / name
    if impl == "python":
        monkeypatch.setenv("PYOVERLAY_NATIVE", "0")  # inherited by the daemon
    else:
        monkeypatch.delenv("PYOVERLAY_NATIVE", raising=False)
    k, p = sides["kernel"], sides["pyoverlay"]
    k_layers = [k / "layers" / f"l{i}" for i in range(3)]
    p_layers = [p / "layers" / f"l{i}" for i in range(3)]
    args = [":".join(map(str, p_layers)), str(p / "upper"), str(p / "work"), str(p / "mnt/merged")]
    watched = (shared, p / "outside")
    outside_before = snapshot(shared), snapshot(p / "outside")
    with (
        kernel_overlay(k_layers, k / "upper", k / "work", k / "mnt/merged"),
        pyoverlay_mount(args, p / "mnt/merged"),
        watching(*watched) as w,
    ):
        before = (snapshot(k / "mnt/merged"), snapshot(p / "mnt/merged"))
        for side in (k, p):
            subprocess.run(
                ["sh", "-c", CLIENT_SCRIPT, "client", str(side / "mnt/merged")],
                check=True, timeout=60, capture_output=True,
            )  # fmt: skip
        after = (snapshot(k / "mnt/merged"), snapshot(p / "mnt/merged"))
        events = w.events()
    assert events == []
    assert diff_views(*map(timeless, before)) == []
    assert diff_views(*map(timeless, after)) == []
    names = {os.path.basename(path) for path in after[1].nodes}
    assert names.isdisjoint(n.encode() for n in OUTSIDE_NAMES)
    assert b"shadow/created" in after[1].nodes and b"etc/hosts" not in after[1].nodes
    for old, root in zip(outside_before, (shared, p / "outside"), strict=True):
        assert diff_views(old, snapshot(root)) == []


def timeless(view: TreeView) -> TreeView:
    """The view without mtimes: the two sides made their new files at different times."""
    nodes = {k: dataclasses.replace(n, mtime_ns=0) for k, n in view.nodes.items()}
    return dataclasses.replace(view, nodes=nodes)
