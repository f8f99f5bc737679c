"""Build OCI image layout tars offline with the standard library (and zstandard).

A layer is a list of :class:`Entry`; an image is a list of (layer, compression).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import tarfile

import zstandard

MEDIA = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "plain": "application/vnd.oci.image.layer.v1.tar",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


@dataclasses.dataclass
class Entry:
    """One tar member. ``kind``: file, dir, symlink, hardlink, char, block, fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, str] = dataclasses.field(default_factory=dict)
    mtime: int = 1_600_000_000


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def layer_tar(entries: list[Entry]) -> bytes:
    """An uncompressed PAX tar of ``entries``, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = _TYPES[e.kind]
            info.mode, info.uid, info.gid, info.mtime = e.mode, e.uid, e.gid, e.mtime
            info.linkname = e.link
            info.devmajor, info.devminor = e.devmajor, e.devminor
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items()}
            if e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, compresslevel=1, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(data)
    return data


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _manifest(layers: list[tuple[list[Entry] | bytes, str]], arch: str, blobs: dict) -> dict:
    """Add one platform's layers, config and manifest to ``blobs``; returns its info."""
    descs, diff_ids = [], []
    for content, how in layers:
        raw = content if isinstance(content, bytes) else layer_tar(content)
        blob = compress(raw, how)
        blobs[_digest(blob)] = blob
        diff_ids.append(_digest(raw))
        descs.append({"mediaType": MEDIA[how], "digest": _digest(blob), "size": len(blob)})
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    blobs[_digest(config)] = config
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _digest(config),
                "size": len(config),
            },
            "layers": descs,
        }
    ).encode()
    blobs[_digest(manifest)] = manifest
    return {
        "layers": [d["digest"] for d in descs],
        "diff_ids": diff_ids,
        "manifest": _digest(manifest),
        "manifest_size": len(manifest),
        "config": _digest(config),
    }


def _layout_tar(name: str, target: dict, blobs: dict[str, bytes]) -> bytes:
    target = {**target, "annotations": {"io.containerd.image.name": name}}
    index = {"schemaVersion": 2, "manifests": [target]}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": json.dumps(index)}
        for digest, blob in blobs.items():
            files["blobs/sha256/" + digest.split(":", 1)[1]] = blob
        for path, data in files.items():
            data = data.encode() if isinstance(data, str) else data
            member = tarfile.TarInfo(path)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return out.getvalue()


def image_tar(name: str, layers: list[tuple[list[Entry] | bytes, str]], arch: str = "amd64"):
    """An OCI layout tar importable by ``ctr images import``; returns (bytes, info).

    ``info`` has the layer blob digests, diff_ids and the manifest digest.
    """
    blobs: dict[str, bytes] = {}
    info = _manifest(layers, arch, blobs)
    target = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": info["manifest"],
        "size": info["manifest_size"],
    }
    return _layout_tar(name, target, blobs), info


def index_image_tar(name: str, per_arch: dict[str, list[tuple[list[Entry] | bytes, str]]]):
    """A multi-platform image (an OCI index); returns (bytes, {arch: info})."""
    blobs: dict[str, bytes] = {}
    infos = {arch: _manifest(layers, arch, blobs) for arch, layers in per_arch.items()}
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": info["manifest"],
                    "size": info["manifest_size"],
                    "platform": {"os": "linux", "architecture": arch},
                }
                for arch, info in infos.items()
            ],
        }
    ).encode()
    blobs[_digest(index)] = index
    target = {
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": _digest(index),
        "size": len(index),
    }
    return _layout_tar(name, target, blobs), infos


def busybox() -> bytes:
    with open("/bin/busybox", "rb") as f:
        return f.read()


def pause_layers() -> list[tuple[list[Entry], str]]:
    """The incident's image: one gzip layer holding ``/pause``."""
    return [
        ([Entry("pause", data=busybox(), mode=0o755), Entry("etc/", "dir", mode=0o755)], "gzip")
    ]


def multi_layers() -> list[tuple[list[Entry], str]]:
    """Three layers (gzip, plain, zstd) with every kind of entry verify must check."""
    base = [
        Entry("bin/", "dir", mode=0o755),
        Entry("bin/busybox", data=busybox(), mode=0o755),
        Entry("bin/sh", "symlink", link="busybox"),
        Entry("etc/", "dir", mode=0o755),
        Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"),
        Entry("etc/secret", data=b"top secret\n", mode=0o600, uid=1000, gid=1000),
        Entry("etc/.wh.never", "file"),  # a whiteout in the base layer: nothing is created
        Entry("data/", "dir", mode=0o755),
        Entry("data/a", data=b"shared by two names\n"),
        Entry("data/b", "hardlink", link="data/a"),
        Entry("data/x", data=b"has an xattr\n", xattrs={"user.note": "hello"}),
        Entry("del/", "dir", mode=0o755),
        Entry("del/gone", data=b"deleted by layer 1\n"),
        Entry("del/keep", data=b"kept\n"),
        Entry("opq/", "dir", mode=0o755),
        Entry("opq/old1", data=b"hidden by the opaque dir\n"),
        Entry("opq/sub/", "dir", mode=0o700),
        Entry("devs/", "dir", mode=0o755),
        Entry("devs/null", "char", mode=0o666, devmajor=1, devminor=3),
        Entry("devs/fifo", "fifo", mode=0o644),
        Entry("tmp/", "dir", mode=0o1777),
    ]
    middle = [
        Entry("del/", "dir", mode=0o755),
        Entry("del/.wh.gone"),
        Entry("opq/", "dir", mode=0o755),
        Entry("opq/.wh..wh..opq"),
        Entry("opq/new", data=b"only this one\n"),
        Entry("data/", "dir", mode=0o755),
        Entry("data/c", data=b"setuid file\n", mode=0o4755),
        Entry("link", "symlink", link="/data/a"),
        Entry("usr/", "dir", mode=0o755),
        Entry("usr/share/", "dir", mode=0o755),
        Entry("usr/share/big", data=bytes(range(256)) * 4096),
    ]
    top = [
        Entry("etc/", "dir", mode=0o755),
        Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/:/bin/sh\n"),
        Entry("data/", "dir", mode=0o755),
        Entry("data/zst", data=b"from a zstd layer\n" * 100, uid=33, gid=44),
    ]
    return [(base, "gzip"), (middle, "plain"), (top, "zstd")]


def chain_id(diff_ids: list[str]) -> str:
    """The chainID of the top layer (the image's snapshot key)."""
    chain = diff_ids[0]
    for diff_id in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
    return chain
