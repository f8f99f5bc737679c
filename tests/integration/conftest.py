"""Fixtures that mount one layer set twice: kernel overlayfs and pyoverlay.

Owns the life cycle of a comparison: build a layer set once per variant, ``cp -a`` an
identical copy for each side (the kernel may write to upper and work), mount, take
snapshots, tear down. Test modules choose the set by defining a ``layer_set`` fixture.
Fixtures are module-scoped so each set is built and mounted once for all its checks;
the teardown in mounts.py runs even when a test fails.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from layersets import LayerSet
from mounts import Side, kernel_overlay, pyoverlay_mount
from treeview import TreeView, snapshot


@dataclasses.dataclass(frozen=True)
class Built:
    layer_set: LayerSet
    kernel_src: Path
    pyoverlay_src: Path


@pytest.fixture(scope="module")
def built(layer_set: LayerSet, tmp_path_factory: pytest.TempPathFactory) -> Built:
    base = tmp_path_factory.mktemp(layer_set.name)
    kernel_src = layer_set.make(base / "src-kernel", "kernel")
    py_src = kernel_src
    if layer_set.variants:
        py_src = layer_set.make(base / "src-pyoverlay", "pyoverlay")
    return Built(layer_set, kernel_src, py_src)


def _copy_side(src: Path, dest: Path, layer_set: LayerSet) -> Side:
    subprocess.run(["cp", "-a", "--", str(src), str(dest)], check=True)
    merged = dest / "merged"
    merged.mkdir()
    upper = work = None
    if layer_set.upper:
        upper, work = dest / "upper", dest / "work"
        work.mkdir()
    return Side(dest, merged, [dest / n for n in layer_set.lower_names()], upper, work)


@pytest.fixture(scope="module")
def kernel_side(built: Built) -> Iterator[Side]:
    ls = built.layer_set
    side = _copy_side(built.kernel_src, built.kernel_src.parent / "kernel", ls)
    lowers = list(side.lowers)
    if not ls.upper and len(lowers) == 1:
        # The kernel wants two lowers for a read-only mount; an empty one changes nothing.
        (side.root / "empty-lower").mkdir()
        lowers.append(side.root / "empty-lower")
    extra: dict[str, str | None] = {}
    if ls.userxattr:
        extra["userxattr"] = None
    if ls.ro_flag:
        extra["ro"] = None
    with kernel_overlay(lowers, side.upper, side.work, side.merged, extra):
        yield side


def pyoverlay_args(ls: LayerSet, side: Side) -> list[str]:
    """The CLI arguments for this set, in the form the set asks for."""
    lower = ":".join(str(p).replace(":", "\\:") for p in side.lowers)
    if ls.cli_form == "readonly":
        return ["--read-only", lower, str(side.merged)]
    if ls.cli_form == "options":
        opts = [f"lowerdir={lower}"]
        if side.upper is not None:
            opts += [f"upperdir={side.upper}", f"workdir={side.work}"]
        if ls.userxattr:
            opts.append("userxattr")
        if ls.ro_flag:
            opts.append("ro")
        return ["-o", ",".join(opts), str(side.merged)]
    assert not ls.userxattr, "userxattr sets use the -o form"
    return [lower, str(side.upper), str(side.work), str(side.merged)]


@pytest.fixture(scope="module")
def pyoverlay_side(built: Built) -> Iterator[Side]:
    ls = built.layer_set
    side = _copy_side(built.pyoverlay_src, built.kernel_src.parent / "pyoverlay", ls)
    side = dataclasses.replace(side, lowers_before=tuple(snapshot(p) for p in side.lowers))
    with pyoverlay_mount(pyoverlay_args(ls, side), side.merged):
        yield side


@pytest.fixture(scope="module")
def kernel_view(kernel_side: Side) -> TreeView:
    # On the first walk of a fresh upper the kernel records origin xattrs for merged
    # directories, and until then its readdir reports the upper dir's d_ino while stat
    # reports the origin's. A first lookup of every name lets it settle.
    for dirpath, dirnames, filenames in os.walk(os.fsencode(kernel_side.merged)):
        for name in [*dirnames, *filenames]:
            os.lstat(os.path.join(dirpath, name))
    return snapshot(kernel_side.merged)


@pytest.fixture(scope="module")
def pyoverlay_view(pyoverlay_side: Side) -> TreeView:
    return snapshot(pyoverlay_side.merged)
