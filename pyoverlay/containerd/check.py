"""Consistency of a containerd root: snapshot records against directories, and blobs.

Reports snapshot records whose directory is gone, directories no record points at,
meta.db snapshot keys the snapshotter does not know, and content blobs that are missing,
have the wrong size or fail their digest.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

from pyoverlay.containerd import fsread
from pyoverlay.containerd.bolt import read_varint
from pyoverlay.containerd.store import BLOBS, SNAPSHOTTER, ContainerdError, ContainerdRoot
from pyoverlay.containerd.verify import Finding

Progress = Callable[[int], None]


def check_snapshots(root: ContainerdRoot) -> list[Finding]:
    """Records without directories, directories without records, dangling meta.db keys."""
    findings = []
    snaps = root.snapshots()
    for snap in sorted(snaps.values(), key=lambda s: s.id):
        if not fsread.is_real_dir(snap.fs):
            gone = snap.fs if os.path.lexists(snap.directory) else snap.directory
            state = "is not a directory" if os.path.lexists(gone) else "is missing"
            findings.append(
                Finding(
                    "record-without-directory",
                    None,
                    f"snapshot {snap.id} ({snap.kind}, {snap.name}): {gone} {state}",
                )
            )
    known_ids = {snap.id for snap in snaps.values()}
    snapdir = os.path.join(root.root, SNAPSHOTTER, "snapshots")
    names = [name for name, _st in fsread.list_dir(snapdir)] if os.path.isdir(snapdir) else []
    for name in sorted(names, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n)):
        if not name.isdigit() or int(name) not in known_ids:
            findings.append(
                Finding(
                    "directory-without-record",
                    None,
                    f"{os.path.join(snapdir, name)}: no snapshot record points at it",
                )
            )
    for namespace in root.namespaces():
        bucket = root.meta.root.bucket(b"v1", namespace.encode(), b"snapshots", b"overlayfs")
        for key, record in bucket.buckets() if bucket else []:
            name = (record.get(b"name") or b"").decode("utf-8", "replace")
            if name not in snaps:
                findings.append(
                    Finding(
                        "key-without-record",
                        None,
                        f"meta.db snapshot {key.decode('utf-8', 'replace')} in {namespace} "
                        f"names {name!r}, which the snapshotter has no record of",
                    )
                )
    return findings


def blob_records(root: ContainerdRoot) -> dict[str, tuple[int | None, list[str]]]:
    """Every content record: digest -> (recorded size, namespaces holding it)."""
    records: dict[str, tuple[int | None, list[str]]] = {}
    for namespace in root.namespaces():
        bucket = root.meta.root.bucket(b"v1", namespace.encode(), b"content", b"blob")
        for key, record in bucket.buckets() if bucket else []:
            digest = key.decode("utf-8", "replace")
            size, spaces = records.get(digest, (read_varint(record.get(b"size")), []))
            records[digest] = (size, [*spaces, namespace])
    return records


def check_blobs(root: ContainerdRoot, progress: Progress | None = None) -> list[Finding]:
    """Blobs that are recorded but missing, or whose size or digest is wrong."""
    findings = []
    records = blob_records(root)
    blobdir = os.path.join(root.root, BLOBS, "sha256")
    on_disk = {
        "sha256:" + name
        for name, _st in (fsread.list_dir(blobdir) if os.path.isdir(blobdir) else [])
    }
    done = 0
    for digest in sorted(set(records) | on_disk):
        size, spaces = records.get(digest, (None, []))
        where = f" (recorded in {', '.join(spaces)})" if spaces else " (no record)"
        if digest not in on_disk:
            findings.append(Finding("blob-missing", None, f"{digest}{where}"))
            continue
        try:
            actual, length = _hash_blob(root.blob_path(digest))
        except (OSError, ContainerdError) as exc:
            findings.append(Finding("blob-unreadable", None, f"{digest}: {exc}"))
            continue
        done += length
        if progress:
            progress(done)
        if actual != digest:
            findings.append(Finding("blob-digest", None, f"{digest} hashes to {actual}{where}"))
        elif size is not None and size != length:
            findings.append(
                Finding("blob-size", None, f"{digest}: {length} bytes, recorded {size}{where}")
            )
    return findings


def _hash_blob(path: str) -> tuple[str, int]:
    fd = fsread.open_noatime(path)
    try:
        sha, length = hashlib.sha256(), 0
        while data := os.read(fd, 1 << 20):
            sha.update(data)
            length += len(data)
    finally:
        os.close(fd)
    return "sha256:" + sha.hexdigest(), length


def blob_bytes(root: ContainerdRoot) -> int:
    """Total size of the content store, for a progress bar."""
    blobdir = os.path.join(root.root, BLOBS, "sha256")
    if not os.path.isdir(blobdir):
        return 0
    return sum(st.st_size for _name, st in fsread.list_dir(blobdir))
