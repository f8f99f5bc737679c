"""containerd's metadata: namespaces, images, containers, snapshots and layer chains.

Reads meta.db (containerd's own database) and the overlayfs snapshotter's metadata.db
with the read-only bbolt reader, and the JSON manifests and configs from the content
store. Resolves an image, container or snapshot name to its chain of snapshot
directories, top layer first, exactly as containerd builds a ``lowerdir``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re

from pyoverlay.containerd.bolt import BoltDB, Bucket, read_uvarint, read_varint
from pyoverlay.containerd.fsread import open_noatime
from pyoverlay.errors import PyoverlayError

META_DB = "io.containerd.metadata.v1.bolt/meta.db"
SNAPSHOTTER = "io.containerd.snapshotter.v1.overlayfs"
SNAPSHOTTER_DB = f"{SNAPSHOTTER}/metadata.db"
BLOBS = "io.containerd.content.v1.content/blobs"
DEFAULT_NAMESPACES = ("default", "k8s.io", "moby")
KINDS = {0: "unknown", 1: "view", 2: "active", 3: "committed"}
MAX_JSON = 32 << 20
DIGEST_RE = re.compile(r"^(sha256):([0-9a-f]{64})$")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


class ContainerdError(PyoverlayError):
    """The containerd root or one of its records cannot be read or resolved."""


@dataclasses.dataclass
class Snapshot:
    """One record of the overlayfs snapshotter (metadata.db)."""

    name: str  # "<namespace>/<seq>/<key>"
    id: int
    kind: str
    parent: str | None
    directory: str
    size: int | None = None
    inodes: int | None = None

    @property
    def namespace(self) -> str:
        return self.name.split("/", 2)[0]

    @property
    def key(self) -> str:
        parts = self.name.split("/", 2)
        return parts[2] if len(parts) == 3 else self.name

    @property
    def fs(self) -> str:
        return os.path.join(self.directory, "fs")


@dataclasses.dataclass
class Layer:
    """One layer of an image: its blob, diff_id, chainID and unpacked snapshot."""

    index: int
    digest: str
    media_type: str
    size: int
    diff_id: str
    chain_id: str
    snapshot: Snapshot | None


@dataclasses.dataclass
class Image:
    namespace: str
    name: str
    digest: str  # the target: a manifest or an index
    media_type: str
    manifest: str | None = None
    config: str | None = None
    layers: list[Layer] = dataclasses.field(default_factory=list)
    error: str | None = None


@dataclasses.dataclass
class Container:
    namespace: str
    id: str
    image: str
    snapshotter: str
    snapshot_key: str


@dataclasses.dataclass
class Target:
    """What a name resolved to, with its snapshot chain (top layer first)."""

    kind: str  # image, container or snapshot
    namespace: str
    name: str
    chain: list[Snapshot]
    also_in: list[str] = dataclasses.field(default_factory=list)


def normalize_ref(name: str) -> str:
    """Docker-style normalisation: ``pause:3.9`` -> ``docker.io/library/pause:3.9``."""
    if re.fullmatch(r"(sha256:)?[0-9a-f]{64}", name):
        return name if name.startswith("sha256:") else "sha256:" + name
    first, slash, rest = name.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost"):
        domain, remainder = "docker.io", name
    else:
        domain, remainder = first, rest
    if domain == "index.docker.io":
        domain = "docker.io"
    if domain == "docker.io" and "/" not in remainder:
        remainder = "library/" + remainder
    if "@" not in remainder and ":" not in remainder.rsplit("/", 1)[-1]:
        remainder += ":latest"
    return f"{domain}/{remainder}"


def chain_ids(diff_ids: list[str]) -> list[str]:
    """chainID of every layer: C0 = D0, Cn = sha256(C(n-1) + " " + Dn)."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            text = f"{chains[-1]} {diff_id}".encode()
            chains.append("sha256:" + hashlib.sha256(text).hexdigest())
    return chains


def _text(bucket: Bucket | None, key: bytes) -> str | None:
    value = bucket.get(key) if bucket is not None else None
    return value.decode("utf-8", "replace") if value is not None else None


class ContainerdRoot:
    """A containerd root directory, read without changing anything in it."""

    def __init__(self, root: str) -> None:
        self.root = root
        meta_path = os.path.join(root, META_DB)
        if not os.path.isfile(meta_path):
            raise ContainerdError(f"{root}: not a containerd root (no {META_DB})")
        self.meta = BoltDB.open(meta_path)
        snap_path = os.path.join(root, SNAPSHOTTER_DB)
        self.snapdb = BoltDB.open(snap_path) if os.path.isfile(snap_path) else None
        self._snapshots: dict[str, Snapshot] | None = None

    # Namespaces, images, containers --------------------------------------------
    def _v1(self) -> Bucket | None:
        return self.meta.root.bucket(b"v1")

    def namespaces(self) -> list[str]:
        v1 = self._v1()
        return [k.decode("utf-8", "replace") for k, _ in v1.buckets()] if v1 else []

    def search_order(self, namespace: str | None) -> list[str]:
        """The namespaces to search: the given one, or default, k8s.io, moby, then others."""
        if namespace is not None:
            return [namespace]
        present = self.namespaces()
        return [ns for ns in DEFAULT_NAMESPACES if ns in present] + [
            ns for ns in present if ns not in DEFAULT_NAMESPACES
        ]

    def _ns_bucket(self, namespace: str, *names: bytes) -> Bucket | None:
        return self.meta.root.bucket(b"v1", namespace.encode(), *names)

    def image_names(self, namespace: str) -> list[str]:
        images = self._ns_bucket(namespace, b"images")
        return [k.decode("utf-8", "replace") for k, _ in images.buckets()] if images else []

    def image(self, namespace: str, name: str) -> Image | None:
        """The image record ``name`` with its layers resolved, or None if absent."""
        bucket = self._ns_bucket(namespace, b"images", name.encode())
        if bucket is None:
            return None
        target = bucket.bucket(b"target")
        image = Image(namespace, name, _text(target, b"digest") or "", "")
        image.media_type = _text(target, b"mediatype") or ""
        try:
            self._fill_layers(image)
        except ContainerdError as exc:
            image.error = str(exc)
        return image

    def images(self, namespace: str) -> list[Image]:
        return [img for n in self.image_names(namespace) if (img := self.image(namespace, n))]

    def containers(self, namespace: str) -> list[Container]:
        bucket = self._ns_bucket(namespace, b"containers")
        result = []
        for key, cbucket in bucket.buckets() if bucket else []:
            result.append(
                Container(
                    namespace,
                    key.decode("utf-8", "replace"),
                    _text(cbucket, b"image") or "",
                    _text(cbucket, b"snapshotter") or "",
                    _text(cbucket, b"snapshotKey") or "",
                )
            )
        return result

    # Content store ----------------------------------------------------------
    def has_content_record(self, namespace: str, digest: str) -> bool:
        """Whether meta.db records blob ``digest`` in ``namespace``."""
        return self._ns_bucket(namespace, b"content", b"blob", digest.encode()) is not None

    def blob_path(self, digest: str) -> str:
        match = DIGEST_RE.match(digest)
        if not match:
            raise ContainerdError(f"unsupported or malformed digest {digest!r}")
        return os.path.join(self.root, BLOBS, match.group(1), match.group(2))

    def read_json_blob(self, digest: str) -> dict:
        """A manifest, index or config from the content store, digest-checked."""
        path = self.blob_path(digest)
        try:
            fd = open_noatime(path)
        except FileNotFoundError:
            raise ContainerdError(f"blob {digest} is missing from the content store") from None
        try:
            data = os.read(fd, MAX_JSON + 1)
        finally:
            os.close(fd)
        if len(data) > MAX_JSON:
            raise ContainerdError(f"blob {digest} is over {MAX_JSON >> 20} MiB: not a manifest")
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise ContainerdError(f"blob {digest} does not match its digest")
        try:
            doc = json.loads(data)
        except ValueError:
            raise ContainerdError(f"blob {digest} is not valid JSON") from None
        if not isinstance(doc, dict):
            raise ContainerdError(f"blob {digest} is not a JSON object")
        return doc

    def _pick_manifest(self, index: dict, digest: str) -> str:
        arch = _ARCH.get(platform.machine(), platform.machine())
        entries = [m for m in index.get("manifests", []) if isinstance(m, dict)]
        wanted = [
            m
            for m in entries
            if (m.get("platform") or {}).get("os", "linux") == "linux"
            and (m.get("platform") or {}).get("architecture", arch) == arch
        ]
        for entry in wanted or entries:
            candidate = str(entry.get("digest", ""))
            if DIGEST_RE.match(candidate) and os.path.exists(self.blob_path(candidate)):
                return candidate
        raise ContainerdError(f"index {digest} has no manifest for linux/{arch} in the store")

    def _fill_layers(self, image: Image) -> None:
        try:
            self._parse_image(image)
        except (TypeError, ValueError, AttributeError) as exc:
            # JSON of the right syntax but the wrong shape (a string where a list goes).
            raise ContainerdError(f"malformed manifest or config: {exc}") from None

    def _parse_image(self, image: Image) -> None:
        digest, doc = image.digest, self.read_json_blob(image.digest)
        for _depth in range(4):  # an index may (rarely) point at another index
            if "manifests" not in doc:
                break
            digest = self._pick_manifest(doc, digest)
            doc = self.read_json_blob(digest)
        image.manifest = digest
        config_digest = str((doc.get("config") or {}).get("digest", ""))
        image.config = config_digest
        config = self.read_json_blob(config_digest)
        diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
        descs = [d for d in doc.get("layers") or [] if isinstance(d, dict)]
        if len(descs) != len(diff_ids):
            raise ContainerdError(
                f"manifest {digest} has {len(descs)} layers but its config {len(diff_ids)} diff_ids"
            )
        for i, (desc, diff_id, chain_id) in enumerate(
            zip(descs, diff_ids, chain_ids(diff_ids), strict=True)
        ):
            image.layers.append(
                Layer(
                    i,
                    str(desc.get("digest", "")),
                    str(desc.get("mediaType", "")),
                    int(desc.get("size") or 0),
                    str(diff_id),
                    chain_id,
                    self.snapshot_for_key(image.namespace, chain_id),
                )
            )

    # Snapshots ---------------------------------------------------------------
    def snapshots(self) -> dict[str, Snapshot]:
        """Every snapshotter record by name (``<ns>/<seq>/<key>``)."""
        if self._snapshots is None:
            self._snapshots = {}
            bucket = self.snapdb.root.bucket(b"v1", b"snapshots") if self.snapdb else None
            for key, sb in bucket.buckets() if bucket else []:
                name = key.decode("utf-8", "replace")
                sid = read_uvarint(sb.get(b"id"))
                if sid is None:
                    continue
                kind = sb.get(b"kind") or b"\0"
                self._snapshots[name] = Snapshot(
                    name,
                    sid,
                    KINDS.get(kind[0], "unknown"),
                    _text(sb, b"parent"),
                    os.path.join(self.root, SNAPSHOTTER, "snapshots", str(sid)),
                    read_varint(sb.get(b"size")),
                    read_varint(sb.get(b"inodes")),
                )
        return self._snapshots

    def snapshot_for_key(self, namespace: str, key: str) -> Snapshot | None:
        """The snapshotter record behind meta.db's ``snapshots/overlayfs/<key>``."""
        record = self._ns_bucket(namespace, b"snapshots", b"overlayfs", key.encode())
        name = _text(record, b"name")
        return self.snapshots().get(name) if name else None

    def chain(self, top: Snapshot) -> list[Snapshot]:
        """``top`` and its ancestors, top first, as the overlay lowerdir lists them."""
        chain = [top]
        snaps = self.snapshots()
        while chain[-1].parent:
            parent = snaps.get(chain[-1].parent)
            if parent is None:
                raise ContainerdError(
                    f"snapshot {chain[-1].name}: parent {chain[-1].parent} has no record"
                )
            if parent in chain or len(chain) > 500:
                raise ContainerdError(f"snapshot {top.name}: parent chain loops")
            chain.append(parent)
        return chain

    # Name resolution -----------------------------------------------------------
    def resolve(self, name: str, namespace: str | None = None) -> Target:
        """An image, container or snapshot name to its chain, searching namespaces."""
        order = self.search_order(namespace)
        for finder in (self._find_image, self._find_container, self._find_snapshot_key):
            hits = [t for ns in order if (t := finder(ns, name)) is not None]
            if hits:
                hits[0].also_in = [t.namespace for t in hits[1:]]
                return hits[0]
        target = self._find_snapshot_anywhere(name, namespace)
        if target is not None:
            return target
        raise ContainerdError(
            f"{name}: no image, container or snapshot of that name "
            f"(searched namespaces: {', '.join(order) or 'none'})"
        )

    def _find_image(self, namespace: str, name: str) -> Target | None:
        names = self.image_names(namespace)
        for candidate in dict.fromkeys([name, normalize_ref(name)]):
            if candidate in names:
                image = self.image(namespace, candidate)
                assert image is not None
                if image.error:
                    raise ContainerdError(f"image {candidate}: {image.error}")
                top = image.layers[-1] if image.layers else None
                if top is None or top.snapshot is None:
                    raise ContainerdError(
                        f"image {candidate} in namespace {namespace} is not unpacked "
                        "for the overlayfs snapshotter"
                    )
                return Target("image", namespace, candidate, self.chain(top.snapshot))
        return None

    def _find_container(self, namespace: str, name: str) -> Target | None:
        for container in self.containers(namespace):
            if container.id != name:
                continue
            if container.snapshotter != "overlayfs":
                raise ContainerdError(
                    f"container {name} uses the {container.snapshotter!r} snapshotter, "
                    "only overlayfs is supported"
                )
            snap = self.snapshot_for_key(namespace, container.snapshot_key)
            if snap is None:
                raise ContainerdError(f"container {name}: its snapshot has no record")
            return Target("container", namespace, name, self.chain(snap))
        return None

    def _find_snapshot_key(self, namespace: str, name: str) -> Target | None:
        snap = self.snapshot_for_key(namespace, name)
        return Target("snapshot", namespace, name, self.chain(snap)) if snap else None

    def _find_snapshot_anywhere(self, name: str, namespace: str | None) -> Target | None:
        """A snapshotter name (``ns/seq/key``) or a snapshot directory number."""
        for snap in self.snapshots().values():
            if namespace is not None and snap.namespace != namespace:
                continue
            if name in (snap.name, str(snap.id)):
                return Target("snapshot", snap.namespace, snap.name, self.chain(snap))
        return None
