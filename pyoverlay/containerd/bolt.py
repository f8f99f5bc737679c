"""A small read-only reader for bbolt files (containerd's meta.db and metadata.db).

It never writes and never locks: containerd holds an exclusive flock on both files while
it runs. The whole file is read into memory at once; the chosen meta page is then read
again and the read is retried if a transaction committed meanwhile, which gives a
consistent snapshot (bbolt writes data pages first and the meta page last, and cannot
reuse the pages of the current tree before the next commit).

Every offset, count and page id read from the file is checked before use, every page
may be claimed by only one bucket, and nesting is bounded, so a corrupt or truncated
file gives a :class:`BoltError` with a one-line reason, never a hang or a crash.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator

from pyoverlay.errors import PyoverlayError

MAGIC = 0xED0CDAED
VERSION = 2
PAGE_HEADER = struct.Struct("<QHHI")  # id, flags, count, overflow
META = struct.Struct("<IIII QQ QQQ Q")  # magic..txid, then checksum
BRANCH_ELEM = struct.Struct("<IIQ")  # pos, ksize, pgid
LEAF_ELEM = struct.Struct("<IIII")  # flags, pos, ksize, vsize
BUCKET_HEADER = struct.Struct("<QQ")  # root pgid, sequence

BRANCH_PAGE, LEAF_PAGE, META_PAGE, FREELIST_PAGE = 0x01, 0x02, 0x04, 0x10
BUCKET_LEAF_FLAG = 0x01
MAX_DEPTH = 64
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 1 << 20
RETRIES = 20

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


class BoltError(PyoverlayError):
    """The file is not a readable bbolt database (corrupt, truncated or changing)."""


def fnv1a64(data: bytes) -> int:
    """FNV-1a 64-bit hash, the checksum bbolt stores in its meta pages."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    return h


class _Meta:
    """One decoded, checksum-verified meta page."""

    __slots__ = ("freelist", "high_water", "page_size", "raw", "root", "txid")

    def __init__(self, raw: bytes) -> None:
        magic, version, page_size, _flags, root, _seq, freelist, hwm, txid, checksum = META.unpack(
            raw
        )
        if magic != MAGIC:
            raise ValueError("bad magic")
        if version != VERSION:
            raise ValueError(f"unsupported version {version}")
        if fnv1a64(raw[:56]) != checksum:
            raise ValueError("meta checksum mismatch")
        if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1):
            raise ValueError(f"bad page size {page_size}")
        self.raw, self.page_size, self.root = raw, page_size, root
        self.freelist, self.high_water, self.txid = freelist, hwm, txid


def _meta_at(data: bytes, offset: int) -> _Meta | None:
    """The valid meta page at ``offset``, or None."""
    start = offset + PAGE_HEADER.size
    if start + META.size > len(data):
        return None
    _pgid, flags, _count, _overflow = PAGE_HEADER.unpack_from(data, offset)
    if not flags & META_PAGE:
        return None
    try:
        return _Meta(bytes(data[start : start + META.size]))
    except ValueError:
        return None


def _find_metas(data: bytes) -> tuple[list[tuple[int, _Meta]], str]:
    """All valid meta pages as (offset, meta), plus why meta 0 was rejected."""
    found: list[tuple[int, _Meta]] = []
    meta0 = _meta_at(data, 0)
    if meta0 is not None:
        found.append((0, meta0))
        second = _meta_at(data, meta0.page_size)
        if second is not None and second.page_size == meta0.page_size:
            found.append((meta0.page_size, second))
        return found, ""
    # Meta 0 is damaged: look for meta 1 at every possible page size, as bbolt does.
    size = MIN_PAGE_SIZE
    while size <= MAX_PAGE_SIZE:
        meta1 = _meta_at(data, size)
        if meta1 is not None and meta1.page_size == size:
            found.append((size, meta1))
            break
        size *= 2
    return found, "meta page 0 invalid"


def _open_noatime(path: str) -> int:
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError:
        # O_NOATIME needs ownership or CAP_FOWNER; fall back to a plain read.
        return os.open(path, flags)


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 22, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


class BoltDB:
    """A consistent in-memory image of one bbolt file, with its root bucket."""

    def __init__(self, data: bytes, path: str = "<memory>") -> None:
        self.path = path
        self.data = data
        metas, why = _find_metas(data)
        if not metas:
            raise BoltError(f"{path}: not a bbolt database or both meta pages are corrupt")
        self._meta_offset, self.meta = max(metas, key=lambda item: item[1].txid)
        self.page_size = self.meta.page_size
        self.damaged_meta = why
        self._claimed: set[int] = set()
        if self.meta.high_water * self.page_size > len(data):
            raise BoltError(
                f"{path}: truncated: {len(data)} bytes but the database uses "
                f"{self.meta.high_water} pages of {self.page_size}"
            )
        self.root = Bucket(self, b"", self.meta.root, None, 0)

    @classmethod
    def open(cls, path: str) -> BoltDB:
        """Read ``path`` consistently without locking or writing it."""
        fd = _open_noatime(path)
        try:
            for _attempt in range(RETRIES):
                data = _read_all(fd)
                db = cls(data, path)
                # A commit while we read rewrites a meta page: re-read both and compare.
                head = os.pread(fd, 2 * db.page_size, 0)
                if head == data[: 2 * db.page_size]:
                    return db
                time.sleep(0.01)
        finally:
            os.close(fd)
        raise BoltError(f"{path}: kept changing while being read; try again")

    def claim(self, pgid: int, path: bytes) -> None:
        """Mark page ``pgid`` as used; a page reached twice means a corrupt tree."""
        if pgid in self._claimed:
            raise BoltError(f"{self.path}: page {pgid} is referenced twice (under {path!r})")
        self._claimed.add(pgid)

    def page(self, pgid: int, path: bytes) -> memoryview:
        """The bytes of page ``pgid`` including its overflow pages, bounds-checked."""
        if pgid < 2 or pgid >= self.meta.high_water:
            raise BoltError(f"{self.path}: page id {pgid} out of range (under {path!r})")
        offset = pgid * self.page_size
        if offset + PAGE_HEADER.size > len(self.data):
            raise BoltError(f"{self.path}: truncated at page {pgid}")
        _id, _flags, _count, overflow = PAGE_HEADER.unpack_from(self.data, offset)
        end = offset + (1 + overflow) * self.page_size
        if pgid + overflow >= self.meta.high_water or end > len(self.data):
            raise BoltError(f"{self.path}: page {pgid} overflows the file (under {path!r})")
        return memoryview(self.data)[offset:end]


class Bucket:
    """A bucket: byte keys mapping to values or nested buckets. Read on first use."""

    def __init__(
        self, db: BoltDB, path: bytes, root: int, inline: memoryview | None, depth: int
    ) -> None:
        if depth > MAX_DEPTH:
            raise BoltError(f"{db.path}: buckets nested too deeply at {path!r}")
        self._db, self.path, self._root, self._inline, self._depth = db, path, root, inline, depth
        self._items: dict[bytes, bytes | Bucket] | None = None

    def _load(self) -> dict[bytes, bytes | Bucket]:
        if self._items is None:
            items: dict[bytes, bytes | Bucket] = {}
            if self._inline is not None:
                self._read_leaf(self._inline, items)
            else:
                self._walk(self._root, items, 0)
            self._items = items
        return self._items

    def _walk(self, pgid: int, items: dict[bytes, bytes | Bucket], depth: int) -> None:
        db = self._db
        if depth > MAX_DEPTH:
            raise BoltError(f"{db.path}: tree too deep under {self.path!r}")
        db.claim(pgid, self.path)
        page = db.page(pgid, self.path)
        _id, flags, count, _overflow = PAGE_HEADER.unpack_from(page, 0)
        if flags & LEAF_PAGE:
            self._read_leaf(page, items)
        elif flags & BRANCH_PAGE:
            for child in self._branch_children(page, count):
                self._walk(child, items, depth + 1)
        else:
            raise BoltError(f"{db.path}: page {pgid} has flags {flags:#x}, expected a tree page")

    def _branch_children(self, page: memoryview, count: int) -> list[int]:
        if PAGE_HEADER.size + count * BRANCH_ELEM.size > len(page):
            raise BoltError(f"{self._db.path}: branch page with {count} elements is too short")
        return [
            BRANCH_ELEM.unpack_from(page, PAGE_HEADER.size + i * BRANCH_ELEM.size)[2]
            for i in range(count)
        ]

    def _read_leaf(self, page: memoryview, items: dict[bytes, bytes | Bucket]) -> None:
        db = self._db
        if len(page) < PAGE_HEADER.size:
            raise BoltError(f"{db.path}: inline bucket {self.path!r} is too short")
        _id, flags, count, _overflow = PAGE_HEADER.unpack_from(page, 0)
        if not flags & LEAF_PAGE and count:
            raise BoltError(f"{db.path}: bucket {self.path!r} has a non-leaf page")
        if PAGE_HEADER.size + count * LEAF_ELEM.size > len(page):
            raise BoltError(f"{db.path}: leaf page with {count} elements is too short")
        for i in range(count):
            elem = PAGE_HEADER.size + i * LEAF_ELEM.size
            eflags, pos, ksize, vsize = LEAF_ELEM.unpack_from(page, elem)
            start = elem + pos
            if start + ksize + vsize > len(page):
                raise BoltError(f"{db.path}: leaf element out of bounds under {self.path!r}")
            key = bytes(page[start : start + ksize])
            value = page[start + ksize : start + ksize + vsize]
            items[key] = self._child(key, value) if eflags & BUCKET_LEAF_FLAG else bytes(value)

    def _child(self, key: bytes, value: memoryview) -> Bucket:
        path = self.path + b"/" + key
        if len(value) < BUCKET_HEADER.size:
            raise BoltError(f"{self._db.path}: bucket header of {path!r} is too short")
        root, _seq = BUCKET_HEADER.unpack_from(value, 0)
        inline = value[BUCKET_HEADER.size :] if root == 0 else None
        return Bucket(self._db, path, root, inline, self._depth + 1)

    # Public mapping-like API -------------------------------------------------
    def get(self, key: bytes) -> bytes | None:
        """The value stored under ``key``, or None (also when it is a bucket)."""
        value = self._load().get(key)
        return value if isinstance(value, bytes) else None

    def bucket(self, *keys: bytes) -> Bucket | None:
        """The nested bucket at ``keys`` (a path of names), or None."""
        current: Bucket = self
        for key in keys:
            child = current._load().get(key)
            if not isinstance(child, Bucket):
                return None
            current = child
        return current

    def items(self) -> Iterator[tuple[bytes, bytes | Bucket]]:
        """(key, value-or-bucket) pairs in key order."""
        items = self._load()
        for key in sorted(items):
            yield key, items[key]

    def buckets(self) -> Iterator[tuple[bytes, Bucket]]:
        """(name, bucket) pairs of the nested buckets, in key order."""
        for key, value in self.items():
            if isinstance(value, Bucket):
                yield key, value

    def keys(self) -> list[bytes]:
        return sorted(self._load())

    def __contains__(self, key: bytes) -> bool:
        return key in self._load()

    def __len__(self) -> int:
        return len(self._load())


def read_uvarint(data: bytes | None) -> int | None:
    """Decode a Go uvarint (snapshot ids); None for missing or malformed input."""
    if not data:
        return None
    result = shift = 0
    for byte in data[:10]:
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result
        shift += 7
    return None


def read_varint(data: bytes | None) -> int | None:
    """Decode a Go zig-zag varint (sizes, inode counts)."""
    value = read_uvarint(data)
    if value is None:
        return None
    return (value >> 1) ^ -(value & 1)
