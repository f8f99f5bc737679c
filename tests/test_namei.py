"""The lookup and readdir rules on real layer directories, without FUSE."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pyoverlay import readdir
from pyoverlay.overlay import Overlay
from pyoverlay.params import MountOptions


def make_layers(tmp_path: Path, count: int) -> list[Path]:
    layers = [tmp_path / f"l{i}" for i in range(count)]
    for layer in layers:
        layer.mkdir()
    return layers


def overlay(layers: list[Path]) -> Overlay:
    return Overlay(MountOptions(lowerdirs=[str(p) for p in layers], read_only=True))


def whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))


def names(ov: Overlay, path: bytes = b"") -> set[bytes]:
    return set(readdir.merged_names(ov.stack, ov.lookup(path)))


def test_non_directory_hides_everything_below(tmp_path: Path) -> None:
    top, bottom = make_layers(tmp_path, 2)
    (top / "x").write_text("top")
    (bottom / "x").mkdir()
    (bottom / "x" / "inner").write_text("hidden")
    ov = overlay([top, bottom])
    res = ov.lookup(b"x")
    assert not res.is_dir and res.top[0].path == str(top)
    assert ov.resolve(b"x/inner") is None


def test_directories_merge_and_topmost_wins(tmp_path: Path) -> None:
    a, b, c = make_layers(tmp_path, 3)
    for layer, name in ((a, "fa"), (b, "fb"), (c, "fc")):
        (layer / "d").mkdir()
        (layer / "d" / name).write_text(name)
        (layer / "d" / "same").write_text(layer.name)
    ov = overlay([a, b, c])
    assert names(ov, b"d") == {b"fa", b"fb", b"fc", b"same"}
    assert ov.lookup(b"d/same").top[0].path == str(a)
    assert ov.lookup(b"d").is_merged
    assert ov.attributes(ov.lookup(b"d")).nlink == 1


@pytest.mark.parametrize("fmt", ["chardev", "dotwh", "xattr"])
def test_every_whiteout_format_hides(tmp_path: Path, fmt: str) -> None:
    top, bottom = make_layers(tmp_path, 2)
    (bottom / "d").mkdir()
    (bottom / "d" / "gone").write_text("x")
    (bottom / "d" / "kept").write_text("x")
    (top / "d").mkdir()
    if fmt == "chardev":
        whiteout(top / "d" / "gone")
    elif fmt == "dotwh":
        (top / "d" / ".wh.gone").write_bytes(b"")
    else:
        os.setxattr(top / "d", "trusted.overlay.opaque", b"x")
        (top / "d" / "gone").write_bytes(b"")
        os.setxattr(top / "d" / "gone", "trusted.overlay.whiteout", b"")
    ov = overlay([top, bottom])
    assert ov.resolve(b"d/gone") is None
    assert names(ov, b"d") == {b"kept"}


@pytest.mark.parametrize(
    "fmt", ["trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque", "file"]
)
def test_every_opaque_format_stops_the_merge(tmp_path: Path, fmt: str) -> None:
    top, bottom = make_layers(tmp_path, 2)
    (bottom / "d").mkdir()
    (bottom / "d" / "below").write_text("x")
    (top / "d").mkdir()
    (top / "d" / "above").write_text("x")
    if fmt == "file":
        (top / "d" / ".wh..wh..opq").write_bytes(b"")
    else:
        os.setxattr(top / "d", fmt, b"y")
    ov = overlay([top, bottom])
    assert names(ov, b"d") == {b"above"}
    assert ov.resolve(b"d/below") is None
    assert not ov.lookup(b"d").is_merged


def test_xattr_x_is_not_opaque(tmp_path: Path) -> None:
    top, bottom = make_layers(tmp_path, 2)
    (bottom / "d").mkdir()
    (bottom / "d" / "below").write_text("x")
    (top / "d").mkdir()
    os.setxattr(top / "d", "trusted.overlay.opaque", b"x")
    assert names(overlay([top, bottom]), b"d") == {b"below"}


def test_whiteout_in_middle_layer_hides_only_below(tmp_path: Path) -> None:
    a, b, c = make_layers(tmp_path, 3)
    whiteout(b / "f")
    (c / "f").write_text("bottom")
    (c / "g").write_text("bottom")
    ov = overlay([a, b, c])
    assert ov.resolve(b"f") is None
    (a / "f").write_text("top")
    ov = overlay([a, b, c])
    assert ov.lookup(b"f").top[0].path == str(a)
    assert names(ov) == {b"f", b"g"}


def test_symlink_in_lower_under_upper_dir_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    top, bottom = make_layers(tmp_path, 2)
    (top / "etc").mkdir()
    (bottom / "etc").symlink_to(outside)
    ov = overlay([top, bottom])
    assert ov.resolve(b"etc/secret") is None
    assert names(ov, b"etc") == set()
    # and a symlink on its own is an object, never a directory to walk through
    (top / "link").symlink_to(outside)
    ov = overlay([top, bottom])
    assert not ov.lookup(b"link").is_dir
    assert ov.resolve(b"link/secret") is None


def test_absolute_redirect_is_followed_below(tmp_path: Path) -> None:
    top, bottom = make_layers(tmp_path, 2)
    (bottom / "old").mkdir()
    (bottom / "old" / "content").write_text("x")
    (top / "new").mkdir()
    os.setxattr(top / "new", "trusted.overlay.redirect", b"/old")
    whiteout(top / "old")
    ov = overlay([top, bottom])
    assert names(ov, b"new") == {b"content"}
    assert ov.resolve(b"old") is None


def test_redirect_cannot_climb(tmp_path: Path) -> None:
    top, bottom = make_layers(tmp_path, 2)
    (top / "d").mkdir()
    os.setxattr(top / "d", "trusted.overlay.redirect", b"/../../etc")
    assert names(overlay([top, bottom]), b"d") == set()


def test_hard_links_share_a_number_and_numbers_are_distinct(tmp_path: Path) -> None:
    (layer,) = make_layers(tmp_path, 1)
    (layer / "a").write_text("x")
    os.link(layer / "a", layer / "b")
    (layer / "c").write_text("x")
    ov = overlay([layer])
    num = {n: ov.attributes(ov.lookup(n)).ino for n in (b"a", b"b", b"c")}
    assert num[b"a"] == num[b"b"] != num[b"c"]
    assert ov.attributes(ov.lookup(b"a")).nlink == 2


def test_non_utf8_and_newline_names(tmp_path: Path) -> None:
    top, bottom = make_layers(tmp_path, 2)
    weird = [b"caf\xe9", b"new\nline", b"sp ace"]
    for name in weird:
        (bottom / os.fsdecode(name)).write_bytes(b"x")
    assert names(overlay([top, bottom])) == set(weird)
