"""Compare unpacked snapshots with the layer blobs they came from.

For each layer the blob is streamed once: its digest and diff_id are checked, and every
tar entry is compared with the snapshot's ``fs`` directory the way containerd's overlay
applier would have written it (whiteouts as char 0/0, opaque dirs as an xattr, the base
layer applied plainly). Findings are one line each. Nothing under the root is written,
and files are opened with O_NOATIME and O_NOFOLLOW.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import os
import stat
from collections.abc import Callable

from pyoverlay.containerd import fsread
from pyoverlay.containerd.store import ContainerdError, ContainerdRoot, Image, Layer
from pyoverlay.containerd.tarlayer import (
    BlobStream,
    LayerError,
    TarEntry,
    clean_path,
    content_chunks,
    entries,
)

OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
KIND_MODES = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}
Progress = Callable[[int], None]


@dataclasses.dataclass
class Finding:
    """One problem: ``path`` is "/name" inside the layer, or None for the layer itself."""

    kind: str
    path: str | None
    detail: str
    below: int = 0  # entries under a missing or extra directory, folded into this line

    def line(self) -> str:
        """The finding as one printable line, whatever bytes the names hold."""
        more = f" (and {self.below} entries below it)" if self.below else ""
        where = f"{printable(self.path)}: " if self.path is not None else ""
        return f"{self.kind}: {where}{printable(self.detail)}{more}"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "path": self.path, "detail": self.detail, "below": self.below}


@dataclasses.dataclass
class LayerResult:
    layer: Layer
    findings: list[Finding]
    uncompressed: int = 0
    same_as: str | None = None  # an earlier image whose check covered this snapshot
    skipped: str | None = None  # why the snapshot could not be compared (not a problem)

    def as_dict(self) -> dict:
        snap = self.layer.snapshot
        return {
            "index": self.layer.index,
            "digest": self.layer.digest,
            "diff_id": self.layer.diff_id,
            "chain_id": self.layer.chain_id,
            "snapshot_id": snap.id if snap else None,
            "directory": snap.fs if snap else None,
            "uncompressed_bytes": self.uncompressed,
            "same_as": self.same_as,
            "skipped": self.skipped,
            "findings": [f.as_dict() for f in self.findings],
        }


@dataclasses.dataclass
class ImageResult:
    image: Image
    layers: list[LayerResult]
    findings: list[Finding]  # problems with the image itself (manifest, config)

    @property
    def problems(self) -> int:
        return len(self.findings) + sum(len(r.findings) for r in self.layers if r.same_as is None)

    def as_dict(self) -> dict:
        return {
            "namespace": self.image.namespace,
            "name": self.image.name,
            "digest": self.image.digest,
            "findings": [f.as_dict() for f in self.findings],
            "layers": [r.as_dict() for r in self.layers],
        }


def printable(text: str) -> str:
    """``text`` with control characters and undecodable bytes escaped, so a hostile
    file name can neither break the one-line-per-finding output nor the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _describe(st: os.stat_result) -> str:
    mode = st.st_mode
    for name, fmt in KIND_MODES.items():
        if stat.S_IFMT(mode) == fmt:
            if name == "file":
                return f"regular file, {st.st_size} bytes"
            if name in ("char", "block"):
                return f"{name} device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            return {"dir": "directory", "symlink": "symlink", "fifo": "fifo"}[name]
    return "unknown type"


def _entry_desc(entry: TarEntry) -> str:
    if entry.kind == "file":
        return f"regular file, {entry.size} bytes, mode {entry.mode:04o}"
    if entry.kind == "dir":
        return f"directory, mode {entry.mode:04o}"
    if entry.kind in ("symlink", "hardlink"):
        return f"{entry.kind} to {entry.linkname}"
    return entry.kind


class _Dirs:
    """Directory fds inside one snapshot, opened a component at a time, never via symlinks.

    A bounded LRU: callers hold at most two fds at once, and those are always the most
    recently used, so evicting the oldest never closes an fd still in use.
    """

    LIMIT = 256

    def __init__(self, fs: str) -> None:
        self.root = fsread.open_noatime(fs, os.O_DIRECTORY)
        self.cache: collections.OrderedDict[str, int | None] = collections.OrderedDict()

    def fd(self, rel: str) -> int | None:
        if not rel:
            return self.root
        if rel in self.cache:
            self.cache.move_to_end(rel)
            return self.cache[rel]
        parent, _, name = rel.rpartition("/")
        pfd = self.fd(parent)
        fd = None
        if pfd is not None:
            try:
                fd = fsread.open_noatime(name, os.O_DIRECTORY, dir_fd=pfd)
            except OSError:
                fd = None  # missing, not a directory, or a symlink: never followed
        self.cache[rel] = fd
        if len(self.cache) > self.LIMIT:
            _old, old_fd = self.cache.popitem(last=False)
            if old_fd is not None:
                os.close(old_fd)
        return fd

    def close(self) -> None:
        for fd in [self.root, *self.cache.values()]:
            if fd is not None:
                os.close(fd)
        self.cache.clear()


def _xattr(pfd: int, name: str, key: str) -> bytes | None:
    """An xattr of ``name`` in the directory ``pfd``, without following a symlink."""
    try:
        return os.getxattr(f"/proc/self/fd/{pfd}/{name}", key, follow_symlinks=False)
    except OSError:
        return None


def _is_opaque(dir_fd: int) -> bool:
    for key in OPAQUE_XATTRS:
        try:
            if os.getxattr(dir_fd, key) == b"y":
                return True
        except OSError:
            continue
    return False


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition("/")
    return parent, name


def _hash_fd(fd: int, limit: int | None = None) -> hashlib._Hash:
    sha = hashlib.sha256()
    offset = 0
    while limit is None or offset < limit:
        want = 1 << 20 if limit is None else min(1 << 20, limit - offset)
        data = os.pread(fd, want, offset)
        if not data:
            break
        sha.update(data)
        offset += len(data)
    return sha


class LayerCheck:
    """One layer's tar stream against one snapshot directory."""

    def __init__(self, stream: BlobStream, fs: str, base: bool, progress: Progress) -> None:
        self.stream, self.fs, self.base, self.progress = stream, fs, base, progress
        self.dirs = _Dirs(fs)
        self.by_path: dict[str, list[Finding]] = {}
        self.expected: set[str] = {""}
        self.missing_dirs: dict[str, Finding] = {}
        self.whiteouts: set[str] = set()
        self.opaque: set[str] = set()

    def add(self, kind: str, path: str, detail: str) -> Finding:
        finding = Finding(kind, "/" + path, detail)
        self.by_path.setdefault(path, []).append(finding)
        return finding

    def run(self) -> tuple[list[Finding], str | None]:
        """All findings, and why the tar could not be read to its end (None if it was)."""
        try:
            for entry in entries(self.stream):
                self._entry(entry)
                self.progress(self.stream.file.count)
            self._check_whiteouts()
            self._check_opaque()
            self._check_extra()
            error = None
        except LayerError as exc:
            error = str(exc)
        finally:
            self.dirs.close()
        return [f for path in sorted(self.by_path) for f in self.by_path[path]], error

    def _entry(self, entry: TarEntry) -> None:
        path = clean_path(entry.name)
        if path is None:
            self.add("unsafe", entry.name.lstrip("/"), "name leaves the layer; not checked")
            return
        if not path:
            return  # the layer root: the snapshotter, not the tar, decides its metadata
        parent, name = _split(path)
        self._expect_parents(parent)
        if name.startswith(".wh."):
            if name == ".wh..wh..opq":
                self.opaque.add(parent)
            elif not name.startswith(".wh..wh."):
                self.whiteouts.add(f"{parent}/{name[4:]}" if parent else name[4:])
            return
        self.by_path.pop(path, None)  # a later entry for the same name wins
        self.expected.add(path)
        if self._under_missing(parent):
            return
        pfd = self.dirs.fd(parent)
        if pfd is None:
            self._missing(entry, path, "its parent directory is not there")
            return
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            self._missing(entry, path, _entry_desc(entry))
            return
        self._compare(entry, path, pfd, name, st)

    def _expect_parents(self, parent: str) -> None:
        while parent and parent not in self.expected:
            self.expected.add(parent)
            parent = parent.rpartition("/")[0]

    def _under_missing(self, parent: str) -> bool:
        probe = parent
        while probe:
            finding = self.missing_dirs.get(probe)
            if finding is not None:
                finding.below += 1
                return True
            probe = probe.rpartition("/")[0]
        return False

    def _missing(self, entry: TarEntry, path: str, detail: str) -> None:
        finding = self.add("missing", path, detail)
        if entry.kind == "dir":
            self.missing_dirs[path] = finding

    def _compare(self, entry: TarEntry, path: str, pfd: int, name: str, st: os.stat_result) -> None:
        if entry.kind == "hardlink":
            self._compare_hardlink(entry, path, st)
            return
        want = KIND_MODES.get(entry.kind)
        if want is None:
            self.add("unsupported", path, f"tar entry type {entry.kind!r} is not checked")
            return
        if stat.S_IFMT(st.st_mode) != want:
            self.add("type", path, f"layer has {_entry_desc(entry)}, disk has {_describe(st)}")
            if entry.kind == "dir":
                self.missing_dirs[path] = self.by_path[path][-1]
            return
        if (st.st_uid, st.st_gid) != (entry.uid, entry.gid):
            self.add("owner", path, f"layer {entry.uid}:{entry.gid}, disk {st.st_uid}:{st.st_gid}")
        if entry.kind != "symlink" and stat.S_IMODE(st.st_mode) != entry.mode:
            self.add("mode", path, f"layer {entry.mode:04o}, disk {stat.S_IMODE(st.st_mode):04o}")
        if entry.kind == "file":
            self._compare_content(entry, path, pfd, name, st)
        elif entry.kind == "symlink":
            target = os.readlink(name, dir_fd=pfd)
            if target != entry.linkname:
                self.add("symlink", path, f"layer -> {entry.linkname!r}, disk -> {target!r}")
        elif entry.kind in ("char", "block"):
            disk = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if disk != (entry.devmajor, entry.devminor):
                self.add(
                    "device",
                    path,
                    f"layer {entry.devmajor}:{entry.devminor}, disk {disk[0]}:{disk[1]}",
                )
        for key, value in entry.xattrs.items():
            disk_value = _xattr(pfd, name, key)
            if disk_value != value:
                shown = "absent" if disk_value is None else repr(disk_value)
                self.add("xattr", path, f"{key}: layer {value!r}, disk {shown}")

    def _compare_hardlink(self, entry: TarEntry, path: str, st: os.stat_result) -> None:
        target = clean_path(entry.linkname)
        if target is None:
            self.add("unsafe", path, f"hard link target {entry.linkname!r} leaves the layer")
            return
        tparent, tname = _split(target)
        tfd = self.dirs.fd(tparent)
        try:
            tst = os.stat(tname, dir_fd=tfd, follow_symlinks=False) if tfd is not None else None
        except FileNotFoundError:
            tst = None
        if tst is None:
            if target in self.expected:
                self.add("hardlink", path, f"link target /{target} is missing")
            return  # a target in a lower layer: containerd copied it up, nothing to compare
        if (tst.st_dev, tst.st_ino) != (st.st_dev, st.st_ino):
            self.add("hardlink", path, f"no longer the same file as /{target}")

    def _compare_content(
        self, entry: TarEntry, path: str, pfd: int, name: str, st: os.stat_result
    ) -> None:
        chunks = content_chunks(self.stream, entry)
        try:
            fd = fsread.open_noatime(name, os.O_NONBLOCK, dir_fd=pfd)
        except OSError as exc:
            self.add("content", path, f"cannot read: {os.strerror(exc.errno or errno.EIO)}")
            return
        try:
            if st.st_size != entry.size:
                tar_sha = hashlib.sha256()
                for chunk in chunks:
                    tar_sha.update(chunk)
                self._content_finding(path, entry.size, tar_sha, st.st_size, _hash_fd(fd))
                return
            offset = 0
            for chunk in chunks:
                disk = os.pread(fd, len(chunk), offset)
                if disk != chunk:
                    # Up to here both were equal: hash the disk's prefix for the tar's.
                    tar_sha = _hash_fd(fd, offset)
                    tar_sha.update(chunk)
                    for rest in chunks:
                        tar_sha.update(rest)
                    self._content_finding(path, entry.size, tar_sha, st.st_size, _hash_fd(fd))
                    return
                offset += len(chunk)
        finally:
            os.close(fd)

    def _content_finding(
        self, path: str, size: int, tar_sha: hashlib._Hash, disk_size: int, disk_sha: hashlib._Hash
    ) -> None:
        self.add(
            "content",
            path,
            f"layer sha256:{tar_sha.hexdigest()[:16]} ({size} bytes), "
            f"disk sha256:{disk_sha.hexdigest()[:16]} ({disk_size} bytes)",
        )

    def _check_whiteouts(self) -> None:
        for path in sorted(self.whiteouts):
            parent, name = _split(path)
            pfd = self.dirs.fd(parent)
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False) if pfd is not None else None
            except FileNotFoundError:
                st = None
            if self.base:
                if st is not None and path not in self.expected:
                    self.expected.add(path)  # reported here, not again as extra
                    self.add(
                        "whiteout", path, f"base layer deletes it, but disk has {_describe(st)}"
                    )
                continue
            self.expected.add(path)
            if st is None:
                if not self._under_missing(parent):
                    self.add("whiteout", path, "lost whiteout (files deleted here resurface)")
            elif not stat.S_ISCHR(st.st_mode) or st.st_rdev != 0:
                self.add("whiteout", path, f"whiteout replaced by {_describe(st)}")

    def _check_opaque(self) -> None:
        if self.base:
            return
        for path in sorted(self.opaque):
            fd = self.dirs.fd(path)
            if fd is not None and not _is_opaque(fd):
                self.add("opaque", path, "lost opaque marker (lower layers show through)")

    def _check_extra(self) -> None:
        extra_dirs: dict[str, Finding] = {}
        for rel, st in fsread.walk(self.fs):
            if rel in self.expected:
                if stat.S_ISDIR(st.st_mode) and rel not in self.opaque:
                    self._check_unexpected_opaque(rel)
                continue
            parent = rel.rpartition("/")[0]
            holder = None
            while parent:
                holder = extra_dirs.get(parent)
                if holder:
                    break
                parent = parent.rpartition("/")[0]
            if holder:
                holder.below += 1
                continue
            finding = self.add("extra", rel, f"{_describe(st)}, not in the layer")
            if stat.S_ISDIR(st.st_mode):
                extra_dirs[rel] = finding

    def _check_unexpected_opaque(self, rel: str) -> None:
        fd = self.dirs.fd(rel)
        if fd is not None and _is_opaque(fd):
            self.add("opaque", rel, "opaque marker not in the layer (hides lower layers)")


def verify_layer(
    root: ContainerdRoot, layer: Layer, progress: Progress | None = None, namespace: str = ""
) -> LayerResult:
    """Check one layer's blob digests and compare it with its snapshot directory."""
    progress = progress or (lambda _n: None)
    result = LayerResult(layer, [])
    add = result.findings.append
    snap = layer.snapshot
    if snap is None:
        add(Finding("snapshot", None, f"not unpacked: no snapshot for chainID {layer.chain_id}"))
    elif not fsread.is_real_dir(snap.fs):
        state = "is not a directory (or is a symlink)" if os.path.lexists(snap.fs) else "is missing"
        add(Finding("snapshot", None, f"snapshot directory {snap.fs} {state}"))
    try:
        blob = root.blob_path(layer.digest)
        stream = BlobStream(blob)
    except FileNotFoundError:
        if not root.has_content_record(namespace, layer.digest):
            # CRI's discard_unpacked_layers drops blob and record after unpacking:
            # nothing is wrong, there is just nothing to compare with.
            result.skipped = "its blob was discarded after unpacking (no content record)"
            return result
        add(Finding("blob", None, f"blob {layer.digest} is missing from the content store"))
        return result
    except (ContainerdError, OSError) as exc:
        add(Finding("blob", None, f"cannot open blob {layer.digest}: {exc}"))
        return result
    try:
        files, error = [], None
        if snap is not None and fsread.is_real_dir(snap.fs):
            files, error = LayerCheck(stream, snap.fs, not snap.parent, progress).run()
        if error is None:
            try:
                stream.drain()
            except LayerError as exc:
                error = str(exc)
        stream.drain_file()
        result.uncompressed = stream.count
        if stream.blob_digest != layer.digest:
            # A corrupt blob says nothing about the snapshot: report only the blob.
            detail = f"blob hashes to {stream.blob_digest}, not {layer.digest}"
            add(Finding("digest", None, detail + "; snapshot not compared"))
        elif error is not None:
            add(Finding("blob", None, f"cannot decode: {error}"))
        else:
            if stream.diff_id != layer.diff_id:
                detail = f"tar hashes to {stream.diff_id}, not {layer.diff_id}"
                add(Finding("diff_id", None, detail))
            result.findings.extend(files)
    finally:
        stream.close()
    return result


def verify_image(
    root: ContainerdRoot,
    image: Image,
    done: dict[int, str],
    progress: Progress | None = None,
) -> ImageResult:
    """Verify every layer of ``image``; ``done`` maps snapshot ids already checked."""
    result = ImageResult(image, [], [])
    if image.error:
        result.findings.append(Finding("image", None, image.error))
    for layer in image.layers:
        snap = layer.snapshot
        if snap is not None and snap.id in done:
            result.layers.append(LayerResult(layer, [], same_as=done[snap.id]))
            continue
        result.layers.append(verify_layer(root, layer, progress, image.namespace))
        if snap is not None:
            done[snap.id] = f"{image.name} [{image.namespace}]"
    return result
