"""Streaming decode of a layer blob (gzip, zstd or plain tar) into tar entries.

One pass over the blob file hashes the compressed bytes (the blob digest) and the
uncompressed bytes (the diff_id) while the tar parser hands out entries and their
content in bounded chunks, so memory stays small for any layer size. The tar parser
understands ustar, GNU long names and PAX headers (path, linkpath, size, ids, xattrs),
which is what image builders emit and what containerd applies.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import posixpath
import zlib
from collections.abc import Iterator

import zstandard

from pyoverlay.containerd.fsread import open_noatime
from pyoverlay.errors import PyoverlayError

CHUNK = 1 << 20
MAX_EXTENDED = 1 << 20  # PAX records and GNU long names
BLOCK = 512
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

TYPES = {
    b"0": "file",
    b"\0": "file",
    b"7": "file",
    b"1": "hardlink",
    b"2": "symlink",
    b"3": "char",
    b"4": "block",
    b"5": "dir",
    b"6": "fifo",
}
HEADER_ONLY = frozenset((b"1", b"2", b"3", b"4", b"5", b"6"))


class LayerError(PyoverlayError):
    """The layer blob cannot be decoded: corrupt compression or tar stream."""


@dataclasses.dataclass
class TarEntry:
    """One tar member as the archive names it (see :func:`clean_path`)."""

    name: str
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    linkname: str
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes]
    offset: int  # of the header in the uncompressed stream
    remaining: int = 0  # content bytes not yet consumed


class _HashingFile:
    """The blob file, hashed as it is read."""

    def __init__(self, path: str) -> None:
        self.fd = open_noatime(path)
        self.sha = hashlib.sha256()
        self.count = 0

    def read(self, n: int = CHUNK) -> bytes:
        data = os.read(self.fd, n if n > 0 else CHUNK)
        self.sha.update(data)
        self.count += len(data)
        return data

    def close(self) -> None:
        os.close(self.fd)


class _Gunzip:
    """gzip (also multi-member) with bounded output per call."""

    def __init__(self, src: _HashingFile) -> None:
        self.src, self.d, self.pending = src, zlib.decompressobj(31), b""

    def read(self, n: int) -> bytes:
        while True:
            if not self.pending:
                self.pending = self.src.read(CHUNK)
                if not self.pending:
                    if not self.d.eof:
                        raise LayerError("gzip stream is truncated")
                    return b""
            if self.d.eof:
                if not self.pending.strip(b"\0"):
                    self.pending = b""  # zero padding after the last member
                    continue
                self.d = zlib.decompressobj(31)  # another gzip member follows
            try:
                out = self.d.decompress(self.pending, n)
            except zlib.error as exc:
                raise LayerError(f"gzip stream is corrupt: {exc}") from None
            self.pending = self.d.unused_data if self.d.eof else self.d.unconsumed_tail
            if out:
                return out


class _Unzstd:
    def __init__(self, src: _HashingFile) -> None:
        self.reader = zstandard.ZstdDecompressor().stream_reader(
            src, read_size=CHUNK, read_across_frames=True
        )

    def read(self, n: int) -> bytes:
        try:
            return self.reader.read(n)
        except zstandard.ZstdError as exc:
            raise LayerError(f"zstd stream is corrupt: {exc}") from None


class BlobStream:
    """Uncompressed bytes of a blob, with both digests computed on the way."""

    def __init__(self, path: str) -> None:
        self.file = _HashingFile(path)
        head = os.pread(self.file.fd, 4, 0)
        if head.startswith(GZIP_MAGIC):
            self.decoder, self.compression = _Gunzip(self.file), "gzip"
        elif head.startswith(ZSTD_MAGIC):
            self.decoder, self.compression = _Unzstd(self.file), "zstd"
        else:
            self.decoder, self.compression = self.file, "plain"
        self.sha = hashlib.sha256()
        self.count = 0
        self.buf = b""
        self.pos = 0

    def _fill(self, n: int) -> None:
        """Make at least ``n`` bytes available in the buffer unless the stream ends."""
        while len(self.buf) - self.pos < n:
            data = self.decoder.read(max(CHUNK, n))
            if not data:
                return
            self.sha.update(data)
            self.count += len(data)
            self.buf = self.buf[self.pos :] + data
            self.pos = 0

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the stream."""
        if len(self.buf) - self.pos < n:
            self._fill(n)
        data = self.buf[self.pos : self.pos + n]
        self.pos += len(data)
        return data

    def read_exact(self, n: int, what: str) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise LayerError(f"tar stream ends inside {what}")
        return data

    @property
    def offset(self) -> int:
        return self.count - (len(self.buf) - self.pos)

    def drain(self) -> None:
        """Consume the rest so both digests cover the whole blob."""
        self.buf, self.pos = b"", 0
        while data := self.decoder.read(CHUNK):
            self.sha.update(data)
            self.count += len(data)

    def drain_file(self) -> None:
        """Read the rest of the blob file so its digest covers all of it."""
        while self.file.read(CHUNK):
            pass

    @property
    def blob_digest(self) -> str:
        return "sha256:" + self.file.sha.hexdigest()

    @property
    def diff_id(self) -> str:
        return "sha256:" + self.sha.hexdigest()

    def close(self) -> None:
        self.file.close()


def _number(field: bytes) -> int:
    """A tar numeric field: octal text, or base-256 when the top bit is set."""
    if field and field[0] & 0x80:
        value = field[0] & 0x3F
        for byte in field[1:]:
            value = (value << 8) | byte
        return -value if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise LayerError(f"bad number {field!r} in a tar header") from None


def _string(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise LayerError("malformed PAX header") from None
        if space < 0 or length <= 0 or pos + length > len(data):
            raise LayerError("malformed PAX header")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return records


def clean_path(name: str) -> str | None:
    """A tar name as a relative path inside the layer, or None if it escapes."""
    path = posixpath.normpath("/" + name).lstrip("/")
    if path == ".":
        return ""
    parts = posixpath.normpath(name.lstrip("/")).split("/")
    if ".." in parts:
        return None
    return path


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156])
    unsigned = sum(header[:148]) + 256 + sum(header[156:])
    if stored == unsigned:
        return True
    # Some old writers summed signed chars; only pay for that on a mismatch.
    high = sum(1 for b in header[:148] + header[156:] if b > 127)
    return stored == unsigned - 256 * high


def entries(stream: BlobStream) -> Iterator[TarEntry]:
    """Tar entries in order; after each, the caller must consume exactly its content

    through :func:`content_chunks` (or it is skipped automatically when the next entry
    is requested).
    """
    pax_global: dict[str, bytes] = {}
    pending: dict[str, bytes] = {}
    long_name = long_link = None
    while True:
        offset = stream.offset
        header = stream.read(BLOCK)
        if len(header) < BLOCK:
            if not header:
                return  # some writers omit the end-of-archive blocks
            raise LayerError(f"tar stream ends inside a header at offset {offset}")
        if header == bytes(BLOCK):
            return
        if not _checksum_ok(header):
            raise LayerError(f"bad tar header checksum at offset {offset}")
        typeflag = header[156:157]
        size = _number(header[124:136])
        if size < 0:
            raise LayerError(f"negative size in tar header at offset {offset}")
        if typeflag in (b"x", b"g", b"L", b"K"):
            if size > MAX_EXTENDED:  # held in memory: refuse absurd sizes, as Go's tar does
                raise LayerError(f"extended header of {size} bytes at offset {offset}")
            data = stream.read_exact(size, "an extended header")
            _skip(stream, _padding(size))
            if typeflag == b"x":
                pending.update(_pax_records(data))
            elif typeflag == b"g":
                pax_global.update(_pax_records(data))
            elif typeflag == b"L":
                long_name = _string(data)
            else:
                long_link = _string(data)
            continue
        pax = {**pax_global, **pending}
        entry = _make_entry(header, typeflag, size, pax, long_name, long_link, offset)
        pending, long_name, long_link = {}, None, None
        if "size" in pax:
            entry.size = _pax_int(pax["size"])
        if typeflag in HEADER_ONLY:
            entry.size = 0  # as Go's archive/tar: these types never carry data
        entry.remaining = entry.size
        yield entry
        # Whatever content the consumer did not read is skipped here.
        _skip(stream, entry.remaining + _padding(entry.size))


def _make_entry(
    header: bytes,
    typeflag: bytes,
    size: int,
    pax: dict[str, bytes],
    long_name: str | None,
    long_link: str | None,
    offset: int,
) -> TarEntry:
    name = _string(header[0:100])
    if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
        name = _string(header[345:500]) + "/" + name
    name = long_name or name
    if "path" in pax:
        name = pax["path"].decode("utf-8", "surrogateescape")
    link = long_link or _string(header[157:257])
    if "linkpath" in pax:
        link = pax["linkpath"].decode("utf-8", "surrogateescape")
    kind = TYPES.get(typeflag)
    if kind is None:
        kind = "unsupported:" + typeflag.decode("latin-1")
    elif typeflag == b"\0" and name.endswith("/"):
        kind = "dir"
    xattrs = {k[13:]: v for k, v in pax.items() if k.startswith("SCHILY.xattr.")}
    for key, value in pax.items():
        if key.startswith("LIBARCHIVE.xattr."):
            try:
                xattrs.setdefault(key[17:], base64.b64decode(value + b"=" * (-len(value) % 4)))
            except ValueError:
                raise LayerError(f"bad base64 in PAX record {key}") from None
    uid = _pax_int(pax["uid"]) if "uid" in pax else _number(header[108:116])
    gid = _pax_int(pax["gid"]) if "gid" in pax else _number(header[116:124])
    return TarEntry(
        name,
        kind,
        _number(header[100:108]) & 0o7777,
        uid,
        gid,
        size,
        link,
        _number(header[329:337]),
        _number(header[337:345]),
        xattrs,
        offset,
    )


def _pax_int(value: bytes) -> int:
    try:
        number = int(value)
    except ValueError:
        raise LayerError(f"bad number {value!r} in a PAX header") from None
    if number < 0:
        raise LayerError(f"negative number {value!r} in a PAX header")
    return number


def _padding(size: int) -> int:
    return -size % BLOCK


def _skip(stream: BlobStream, n: int) -> None:
    while n > 0:
        got = len(stream.read(min(n, CHUNK)))
        if not got:
            raise LayerError("tar stream ends inside an entry")
        n -= got


def content_chunks(stream: BlobStream, entry: TarEntry) -> Iterator[bytes]:
    """The content of a regular-file entry in chunks of at most CHUNK bytes."""
    remaining = entry.size
    while remaining > 0:
        data = stream.read(min(remaining, CHUNK))
        if not data:
            raise LayerError(f"tar stream ends inside {entry.name!r}")
        remaining -= len(data)
        entry.remaining = remaining
        yield data
