"""Layer blob decoding and tar parsing, and the per-layer comparison on hand-made dirs."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyoverlay.containerd.store import chain_ids, normalize_ref
from pyoverlay.containerd.tarlayer import (
    BlobStream,
    LayerError,
    clean_path,
    content_chunks,
    entries,
)
from pyoverlay.containerd.verify import LayerCheck
from pyoverlay.errors import PyoverlayError


def make_tar(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


def info(name: str, kind: bytes = tarfile.REGTYPE, **kw) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = kw.pop("mode", 0o644)
    for key, value in kw.items():
        setattr(ti, key, value)
    return ti


def read_all(path: Path) -> tuple[list[tuple], BlobStream]:
    stream = BlobStream(str(path))
    found = []
    for entry in entries(stream):
        data = b"".join(content_chunks(stream, entry)) if entry.kind == "file" else b""
        found.append((entry.name, entry.kind, entry.mode, entry.uid, entry.linkname, data))
    stream.drain()
    return found, stream


@pytest.mark.parametrize("how", ["plain", "gzip", "gzip-multi", "gzip-padded", "zstd"])
def test_decode_and_digests(tmp_path: Path, how: str) -> None:
    raw = make_tar([(info("a"), b"hello" * 1000), (info("d/", tarfile.DIRTYPE, mode=0o755), b"")])
    if how == "plain":
        blob = raw
    elif how == "gzip":
        blob = gzip.compress(raw)
    elif how == "gzip-multi":
        blob = gzip.compress(raw[:1000]) + gzip.compress(raw[1000:])
    elif how == "gzip-padded":
        blob = gzip.compress(raw) + b"\0" * 100
    else:
        blob = zstandard.ZstdCompressor().compress(raw)
    path = tmp_path / "blob"
    path.write_bytes(blob)
    found, stream = read_all(path)
    assert [(n, k, d[:5]) for n, k, _m, _u, _l, d in found] == [
        ("a", "file", b"hello"),
        ("d/", "dir", b""),
    ]
    assert stream.blob_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert stream.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_long_names_pax_xattrs_and_big_ids(tmp_path: Path) -> None:
    long = "x/" * 80 + "file"
    members = [
        (info(long, uid=3_000_000_000), b"data"),
        (info("l", tarfile.SYMTYPE, linkname="t" * 200), b""),
    ]
    members[0][0].pax_headers = {"SCHILY.xattr.user.k": "v\u00e9"}
    path = tmp_path / "blob"
    path.write_bytes(make_tar(members))
    found, _ = read_all(path)
    assert found[0][0] == long and found[0][3] == 3_000_000_000 and found[0][5] == b"data"
    assert found[1][4] == "t" * 200
    stream = BlobStream(str(path))
    first = next(entries(stream))
    assert first.xattrs == {"user.k": "v\u00e9".encode()}
    gnu = tmp_path / "gnu"
    gnu.write_bytes(make_tar([(info(long, uid=3_000_000_000), b"z")], tarfile.GNU_FORMAT))
    found, _ = read_all(gnu)
    assert (found[0][0], found[0][3]) == (long, 3_000_000_000)


def test_truncated_and_corrupt_streams(tmp_path: Path) -> None:
    raw = make_tar([(info("a"), os.urandom(5000))])
    path = tmp_path / "blob"
    path.write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(LayerError, match=r"truncated|corrupt"):
        read_all(path)
    bad = bytearray(raw)
    bad[10] ^= 0xFF  # inside the name: the header checksum no longer matches
    path.write_bytes(bytes(bad))
    with pytest.raises(LayerError, match="checksum"):
        read_all(path)
    path.write_bytes(raw[:1000])
    with pytest.raises(LayerError, match="ends inside"):
        read_all(path)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=3000),
    edits=st.lists(st.tuples(st.integers(0, 2047), st.integers(0, 255)), max_size=6),
)
def test_fuzz_tar_parser(tmp_path_factory, data: bytes, edits) -> None:
    raw = bytearray(make_tar([(info("a"), data), (info("b/", tarfile.DIRTYPE), b"")]))
    for offset, value in edits:
        raw[offset % len(raw)] = value
    path = tmp_path_factory.mktemp("fuzz") / "blob"
    path.write_bytes(bytes(raw))
    try:
        read_all(path)
    except LayerError as exc:
        assert isinstance(exc, PyoverlayError) and "\n" not in str(exc)


def test_clean_path() -> None:
    assert clean_path("./a/b/") == "a/b"
    assert clean_path("/a/./b") == "a/b"
    assert clean_path("a/../b") == "b"
    assert clean_path("./") == ""
    assert clean_path("../x") is None
    assert clean_path("a/../../x") is None


def test_normalize_ref_and_chain_ids() -> None:
    assert normalize_ref("pause:3.9") == "docker.io/library/pause:3.9"
    assert normalize_ref("busybox") == "docker.io/library/busybox:latest"
    assert normalize_ref("test/multi:1") == "docker.io/test/multi:1"
    assert normalize_ref("registry.k8s.io/pause:3.9") == "registry.k8s.io/pause:3.9"
    assert normalize_ref("localhost/x") == "localhost/x:latest"
    assert normalize_ref("host:5000/x/y") == "host:5000/x/y:latest"
    assert normalize_ref("index.docker.io/library/x:1") == "docker.io/library/x:1"
    digest = "sha256:" + "a" * 64
    assert normalize_ref(f"x@{digest}") == f"docker.io/library/x@{digest}"
    d0, d1 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    assert chain_ids([d0, d1]) == [
        d0,
        "sha256:" + hashlib.sha256(f"{d0} {d1}".encode()).hexdigest(),
    ]


def _check(tmp_path: Path, raw: bytes, fs: Path, base: bool = False) -> set[tuple]:
    path = tmp_path / "blob"
    path.write_bytes(raw)
    stream = BlobStream(str(path))
    try:
        found, error = LayerCheck(stream, str(fs), base, lambda _n: None).run()
    finally:
        stream.close()
    assert error is None
    return {(f.kind, f.path) for f in found}


def test_never_follows_symlinks_out_of_the_layer(tmp_path: Path) -> None:
    """Untrusted layers: '..' names and symlinked parents never reach outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host file")
    fs = tmp_path / "fs"
    fs.mkdir()
    (fs / "lib").symlink_to(outside)  # damage: a directory replaced by a symlink
    raw = make_tar(
        [
            (info("lib/", tarfile.DIRTYPE, mode=0o755), b""),
            (info("lib/secret"), b"host file"),
            (info("../outside/secret"), b"host file"),
        ]
    )
    assert _check(tmp_path, raw, fs) == {
        ("type", "/lib"),
        ("unsafe", "/../outside/secret"),
    }


def test_whiteouts_and_opaque_in_base_and_upper_layers(tmp_path: Path) -> None:
    raw = make_tar(
        [
            (info("d/", tarfile.DIRTYPE, mode=0o755), b""),
            (info("d/.wh..wh..opq"), b""),
            (info("d/.wh.gone"), b""),
            (info("d/keep"), b"k"),
        ]
    )
    fs = tmp_path / "fs"
    (fs / "d").mkdir(parents=True)
    os.chmod(fs / "d", 0o755)
    (fs / "d" / "keep").write_bytes(b"k")
    os.chmod(fs / "d" / "keep", 0o644)
    # Base layer: whiteouts only delete, nothing is created; no opaque xattr needed.
    assert _check(tmp_path, raw, fs, base=True) == set()
    # Upper layer: both markers are required.
    assert _check(tmp_path, raw, fs) == {("whiteout", "/d/gone"), ("opaque", "/d")}
    os.mknod(fs / "d" / "gone", 0o20000, 0)
    os.setxattr(fs / "d", "trusted.overlay.opaque", b"y")
    assert _check(tmp_path, raw, fs) == set()
    # In the base layer a whited-out name that exists is a problem (reported once).
    assert _check(tmp_path, raw, fs, base=True) == {("whiteout", "/d/gone")}


def test_hostile_names_stay_on_one_line(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    fs.mkdir()
    name = "evil\nmissing: /fake\x1b[2J" + b"\xff".decode("utf-8", "surrogateescape")
    raw = make_tar([(info(name), b"x")], tarfile.GNU_FORMAT)
    path = tmp_path / "blob"
    path.write_bytes(raw)
    stream = BlobStream(str(path))
    try:
        found, error = LayerCheck(stream, str(fs), True, lambda _n: None).run()
    finally:
        stream.close()
    assert error is None and [f.kind for f in found] == ["missing"]
    line = found[0].line()
    assert "\n" not in line and "\x1b" not in line and line.isprintable()
    assert "evil\\nmissing" in line and "\\udcff" in line


def test_many_directories_exercise_the_fd_cache(tmp_path: Path) -> None:
    members = []
    for i in range(300):
        members.append((info(f"d{i}/", tarfile.DIRTYPE, mode=0o755), b""))
        members.append((info(f"d{i}/sub/", tarfile.DIRTYPE, mode=0o755), b""))
        members.append((info(f"d{i}/sub/f"), b"%d" % i))
    members.append((info("d0/late"), b"after 300 other directories"))
    raw = make_tar(members)
    fs = tmp_path / "fs"
    fs.mkdir()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        tar.extractall(fs, filter="fully_trusted")
    assert _check(tmp_path, raw, fs, base=True) == set()
    (fs / "d150/sub/f").unlink()
    (fs / "d0/late").write_bytes(b"changed")
    assert _check(tmp_path, raw, fs, base=True) == {
        ("missing", "/d150/sub/f"),
        ("content", "/d0/late"),
    }


def test_huge_extended_header_is_refused_not_buffered(tmp_path: Path) -> None:
    header = bytearray(512)
    header[0:4] = b"././"
    header[100:108] = b"0000644\0"
    header[124:136] = b"%011o\0" % (1 << 34)  # a 16 GiB PAX header
    header[156:157] = b"x"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    path = tmp_path / "blob"
    path.write_bytes(bytes(header) + bytes(1024))
    with pytest.raises(LayerError, match="extended header of 17179869184 bytes"):
        read_all(path)
