"""The benchmark fixture: layer trees, the merged plain copy and the source tarball.

Everything here is deterministic (content and sizes come from hashes of the paths), so
every target sees the same bytes and a rebuilt fixture is the same fixture. A manifest
records what was built; a fixture directory whose manifest matches the sizes is reused.

Layout under the fixture directory::

    lower1 lower2 lower3   the main stack (lower1 is the top), 3 layers
    upper                  template for the upper layer (copied fresh per session)
    lower-huge             a 4th, bottom layer holding the 1 GiB file for copy-up latency
    rss1 rss2 rss3         a separate stack with many entries, for daemon memory
    plain                  a single merged copy of the main stack (the physical limit)
    src.tar                a source tree of small files, for untar
    manifest.json
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1 << 20
FILES_PER_DIR = 30
DIRS_PER_PKG = 10
TAR_FILES_PER_DIR = 20
FIXED_MTIME = 1_700_000_000
OPAQUE_XATTR = "trusted.overlay.opaque"
MANIFEST_VERSION = 3


@dataclass(frozen=True)
class Sizes:
    """How big each part of the fixture and each workload is."""

    tree_paths: int = 9_000  # distinct paths of the nested tree
    shadows: int = 1_000  # tree paths that also exist in a second lower layer
    bigdir_entries: int = 10_000  # the merged directory spread over the 3 layers
    big_file_mib: int = 256
    huge_file_mib: int = 1024
    upper_overrides: int = 200
    upper_new: int = 100
    upper_whiteouts: int = 50
    tar_files: int = 5_000
    negative_lookups: int = 50_000
    random_reads: int = 4_000
    chmod_files: int = 1_000
    create_files: int = 5_000
    rss_entries: int = 100_000


FULL = Sizes()
QUICK = Sizes(
    tree_paths=450,
    shadows=50,
    bigdir_entries=300,
    big_file_mib=8,
    huge_file_mib=32,
    upper_overrides=20,
    upper_new=10,
    upper_whiteouts=5,
    tar_files=200,
    negative_lookups=2_000,
    random_reads=200,
    chmod_files=50,
    create_files=100,
    rss_entries=2_000,
)


@dataclass
class Fixture:
    """What was built, with paths relative to a layer or merged root."""

    root: str
    sizes: Sizes
    tree_dirs: list[str] = field(default_factory=list)
    visible_files: list[str] = field(default_factory=list)
    chmod_paths: list[str] = field(default_factory=list)
    create_dir: str = ""
    bigdir: str = "bigdir"
    big_file: str = "data/big256.bin"
    huge_file: str = "huge/file1g.bin"
    merged_entries: int = 0  # what a full walk of the merged main stack must count
    rss_merged_entries: int = 0

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    @property
    def main_lowers(self) -> list[str]:
        return [self.path(f"lower{i}") for i in (1, 2, 3)]

    @property
    def plain(self) -> str:
        return self.path("plain")

    @property
    def tarball(self) -> str:
        return self.path("src.tar")

    @property
    def statlist(self) -> str:
        return self.path("statlist.txt")

    def stack(self, kind: str) -> tuple[list[str], str | None]:
        """Lower layers (top first) and the upper template of a layer stack."""
        if kind == "main":
            return self.main_lowers, self.path("upper")
        if kind == "huge":
            return [*self.main_lowers, self.path("lower-huge")], self.path("upper")
        if kind == "rss":
            return [self.path(f"rss{i}") for i in (1, 2, 3)], None
        raise ValueError(f"unknown layer stack {kind!r}")


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


_POOL = random.Random(0x0B5E).randbytes(256 * 1024)


def _content(key: str) -> bytes:
    """Deterministic bytes for a small file: mostly small, a few tens of KiB."""
    h = _digest(key)
    bucket = h % 100
    if bucket < 60:
        size = h % 2048
    elif bucket < 95:
        size = 2048 + h % (14 * 1024)
    else:
        size = 16 * 1024 + h % (48 * 1024)
    start = (h >> 20) % (len(_POOL) - size)
    return _POOL[start : start + size]


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _write_big(path: str, mib: int, seed: int) -> None:
    """A non-sparse file; each MiB differs so nothing can share blocks."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    block = bytearray(random.Random(seed).randbytes(MIB))
    with open(path, "wb") as f:
        for i in range(mib):
            block[:8] = i.to_bytes(8, "little")
            f.write(block)
    os.chmod(path, 0o644)


class _Layer:
    """Files, whiteouts and opaque dirs of one layer, applied in order when merging."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.files: dict[str, bytes | None] = {}  # None: a big file written separately
        self.whiteouts: list[str] = []
        self.opaque: list[str] = []
        self.dirs: set[str] = set()

    def add(self, rel: str, data: bytes | None) -> None:
        self.files[rel] = data
        self._add_parents(rel)

    def _add_parents(self, rel: str) -> None:
        parent = os.path.dirname(rel)
        while parent:
            self.dirs.add(parent)
            parent = os.path.dirname(parent)


def _tree_dir(index: int) -> str:
    return f"src/pkg{index // DIRS_PER_PKG:03d}/mod{index % DIRS_PER_PKG:02d}"


def _plan_main(sizes: Sizes) -> tuple[list[_Layer], list[str]]:
    """Decide what each layer of the main stack holds; returns layers bottom first."""
    lowers = [_Layer(f"lower{i}") for i in (3, 2, 1)]  # bottom first
    ndirs = math.ceil(sizes.tree_paths / FILES_PER_DIR)
    tree_dirs = [_tree_dir(i) for i in range(ndirs)]
    paths = [
        f"{tree_dirs[i // FILES_PER_DIR]}/file{i % FILES_PER_DIR:03d}.c"
        for i in range(sizes.tree_paths)
    ]
    shadow_every = max(1, sizes.tree_paths // max(1, sizes.shadows))
    for i, rel in enumerate(paths):
        layer = _digest(rel) % 3
        lowers[layer].add(rel, _content(f"{rel}@{layer}"))
        if sizes.shadows and i % shadow_every == 0 and i // shadow_every < sizes.shadows:
            other = (layer + 1) % 3
            lowers[other].add(rel, _content(f"{rel}@{other}"))
    for i in range(sizes.bigdir_entries):
        lowers[i % 3].add(f"bigdir/entry{i:05d}", _content(f"bigdir{i}")[:64])
    lowers[0].add("data/big256.bin", None)
    upper = _plan_upper(sizes, paths, tree_dirs)
    return [*lowers, upper], tree_dirs


def _plan_upper(sizes: Sizes, paths: list[str], tree_dirs: list[str]) -> _Layer:
    upper = _Layer("upper")
    order = sorted(paths, key=lambda p: _digest("upper:" + p))
    for rel in order[: sizes.upper_overrides]:
        upper.add(rel, _content(f"{rel}@upper"))
    cut = sizes.upper_overrides
    for rel in order[cut : cut + sizes.upper_whiteouts]:
        upper.whiteouts.append(rel)
        upper._add_parents(rel)
    for i in range(sizes.upper_new):
        upper.add(f"{tree_dirs[i % len(tree_dirs)]}/upper-new{i:04d}.h", _content(f"new{i}"))
    # One opaque directory, as left behind by `rm -rf dir; mkdir dir` on a mounted overlay.
    opaque = tree_dirs[-1]
    upper.opaque.append(opaque)
    upper.dirs.add(opaque)
    for i in range(3):
        upper.add(f"{opaque}/fresh{i}.c", _content(f"fresh{i}"))
    return upper


def _merge(layers: list[_Layer]) -> tuple[dict[str, _Layer], set[str]]:
    """The merged view of layers given bottom first: path -> layer holding it, and dirs."""
    files: dict[str, _Layer] = {}
    dirs: set[str] = set()
    for layer in layers:
        for d in layer.opaque:
            files = {p: src for p, src in files.items() if not p.startswith(d + "/")}
        for rel in layer.whiteouts:
            files.pop(rel, None)
        for rel in layer.files:
            files[rel] = layer
        dirs |= layer.dirs
    return files, dirs


def _materialize(root: str, layer: _Layer, sizes: Sizes) -> None:
    base = os.path.join(root, layer.name)
    os.makedirs(base, mode=0o755, exist_ok=True)
    for d in sorted(layer.dirs):
        os.makedirs(os.path.join(base, d), mode=0o755, exist_ok=True)
    for rel, data in layer.files.items():
        if data is None:
            _write_big(os.path.join(base, rel), sizes.big_file_mib, seed=256)
        else:
            _write(os.path.join(base, rel), data)
    for rel in layer.whiteouts:
        os.mknod(os.path.join(base, rel), stat.S_IFCHR | 0o600, os.makedev(0, 0))
    for d in layer.opaque:
        os.setxattr(os.path.join(base, d), OPAQUE_XATTR, b"y")


def _build_plain(root: str, files: dict[str, _Layer], dirs: set[str]) -> None:
    plain = os.path.join(root, "plain")
    os.makedirs(plain, mode=0o755)
    for d in sorted(dirs):
        os.makedirs(os.path.join(plain, d), mode=0o755, exist_ok=True)
    for rel, layer in files.items():
        dst = os.path.join(plain, rel)
        shutil.copyfile(os.path.join(root, layer.name, rel), dst)
        os.chmod(dst, 0o644)


def _build_rss(root: str, entries: int) -> int:
    """Empty files spread over 3 layers in merged directories of 1,000 entries."""
    per_dir = 1000
    dirs = set()
    for i in range(entries):
        rel = f"r{i // per_dir:03d}/f{i % per_dir:04d}"
        layer_dir = os.path.join(root, f"rss{1 + i % 3}")
        path = os.path.join(layer_dir, rel)
        if (layer_dir, rel.split("/")[0]) not in dirs:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            dirs.add((layer_dir, rel.split("/")[0]))
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
    for i in (1, 2, 3):
        os.makedirs(os.path.join(root, f"rss{i}"), mode=0o755, exist_ok=True)
    return entries + math.ceil(entries / per_dir)


def _build_tarball(path: str, count: int) -> None:
    """A source tree of small files, byte-for-byte the same on every build."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        seen_dirs: set[str] = set()
        for i in range(count):
            d = f"proj/dir{i // TAR_FILES_PER_DIR:03d}"
            if d not in seen_dirs:
                seen_dirs.add(d)
                tar.addfile(_tarinfo(d, tarfile.DIRTYPE, 0o755, 0))
            data = _content(f"tar{i}")[:8192] or b"\n"
            info = _tarinfo(f"{d}/unit{i:05d}.c", tarfile.REGTYPE, 0o644, len(data))
            tar.addfile(info, _BytesReader(data))


def _tarinfo(name: str, kind: bytes, mode: int, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.mtime = kind, mode, size, FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        chunk, self.pos = self.data[self.pos : end], min(end, len(self.data))
        return chunk


def _pick_chmod_paths(files: dict[str, _Layer], count: int) -> list[str]:
    lower_only = [p for p, layer in files.items() if p.startswith("src/") and layer.name != "upper"]
    lower_only.sort(key=lambda p: _digest("chmod:" + p))
    return sorted(lower_only[:count])


def repair_plain(fx: Fixture) -> None:
    """Undo what an interrupted earlier run may have left in the shared plain copy."""
    os.truncate(os.path.join(fx.plain, fx.big_file), fx.sizes.big_file_mib * MIB)
    for rel in fx.chmod_paths:
        os.chmod(os.path.join(fx.plain, rel), 0o644)
    shutil.rmtree(os.path.join(fx.plain, "untar-dest"), ignore_errors=True)
    create_dir = os.path.join(fx.plain, fx.create_dir)
    for name in os.listdir(create_dir):
        if name.startswith("cfu-"):
            os.unlink(os.path.join(create_dir, name))


def _manifest_key(sizes: Sizes) -> dict[str, object]:
    return {"version": MANIFEST_VERSION, "sizes": dataclasses.asdict(sizes)}


def load_or_build(root: str, sizes: Sizes, log=print) -> Fixture:
    """Reuse the fixture in ``root`` if it was built with these sizes, else build it."""
    manifest = Path(root, "manifest.json")
    if manifest.exists():
        data = json.loads(manifest.read_text())
        if data.get("key") == _manifest_key(sizes):
            fx = Fixture(root=root, sizes=sizes, **data["fixture"])
            repair_plain(fx)
            return fx
        log(f"fixture in {root} was built with other sizes; rebuilding")
        shutil.rmtree(root)
    return build(root, sizes, log)


def build(root: str, sizes: Sizes, log=print) -> Fixture:
    """Build every part of the fixture under ``root`` (which must not exist)."""
    os.makedirs(root, mode=0o755)
    os.umask(0o022)
    log(f"building fixture in {root} ...")
    layers, tree_dirs = _plan_main(sizes)
    for layer in layers:
        _materialize(root, layer, sizes)
    files, dirs = _merge(layers)
    _build_plain(root, files, dirs)
    _write_big(os.path.join(root, "lower-huge", "huge/file1g.bin"), sizes.huge_file_mib, 1024)
    rss_entries = _build_rss(root, sizes.rss_entries)
    _build_tarball(os.path.join(root, "src.tar"), sizes.tar_files)
    fx = Fixture(
        root=root,
        sizes=sizes,
        tree_dirs=tree_dirs,
        visible_files=sorted(files),
        chmod_paths=_pick_chmod_paths(files, sizes.chmod_files),
        create_dir=tree_dirs[0],
        merged_entries=len(files) + len(dirs),
        rss_merged_entries=rss_entries,
    )
    Path(fx.statlist).write_text("".join(p + "\n" for p in fx.visible_files))
    fields = {k: v for k, v in dataclasses.asdict(fx).items() if k not in ("root", "sizes")}
    Path(root, "manifest.json").write_text(
        json.dumps({"key": _manifest_key(sizes), "fixture": fields})
    )
    log(f"fixture ready: {fx.merged_entries} merged entries, {len(layers)} layers")
    return fx
