"""The bbolt reader: round trips through our test writer, meta choice, corruption fuzz."""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
from boltwriter import build, meta_page
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyoverlay.containerd.bolt import (
    BoltDB,
    BoltError,
    fnv1a64,
    read_uvarint,
    read_varint,
)
from pyoverlay.errors import PyoverlayError


def dump(bucket) -> dict:
    return {k: v if isinstance(v, bytes) else dump(v) for k, v in bucket.items()}


TREE = {
    b"v1": {
        b"version": b"\x03",
        b"big": b"x" * 10000,
        b"default": {b"images": {b"docker.io/library/pause:3.9": {b"target": {b"digest": b"d"}}}},
        **{b"k%03d" % i: {b"x": b"%d" % i} for i in range(40)},
    },
    b"empty": {},
}

keys = st.binary(min_size=1, max_size=12)
trees = st.recursive(
    st.binary(max_size=300),
    lambda children: st.dictionaries(keys, children, max_size=12),
    max_leaves=40,
).filter(lambda t: isinstance(t, dict))


def test_fnv1a64_known_values() -> None:
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C


@pytest.mark.parametrize("page_size", [512, 1024, 4096, 16384, 65536])
def test_round_trip_any_page_size(page_size: int) -> None:
    db = BoltDB(build(TREE, page_size, leaf_max=5, fanout=3))
    assert db.page_size == page_size
    assert dump(db.root) == TREE
    assert db.root.bucket(b"v1", b"default", b"images") is not None
    assert db.root.bucket(b"v1", b"nope") is None
    assert db.root.bucket(b"v1").get(b"big") == b"x" * 10000  # overflow pages


@settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees, page_size=st.sampled_from([512, 4096, 8192]), leaf_max=st.integers(1, 9))
def test_round_trip_random_trees(tree: dict, page_size: int, leaf_max: int) -> None:
    db = BoltDB(build(tree, page_size, leaf_max=leaf_max, fanout=2))
    assert dump(db.root) == tree


def _with_metas(data: bytes, page_size: int, meta0: bytes, meta1: bytes) -> bytes:
    out = bytearray(data)
    out[0:page_size] = meta0
    out[page_size : 2 * page_size] = meta1
    return bytes(out)


def test_highest_valid_txid_wins_and_bad_checksum_is_skipped() -> None:
    ps = 4096
    old = build({b"a": {b"which": b"old"}}, ps)
    new_tree_file = build({b"a": {b"which": b"old"}, b"b": {b"which": b"new"}}, ps)
    # Same page layout start: build a file with both trees by concatenating pages.
    data = new_tree_file
    root_new = struct.unpack_from("<Q", data, ps + 16 + 16)[0]
    root_old = struct.unpack_from("<Q", old, ps + 16 + 16)[0]
    assert root_old == root_new  # both start at page 3; use the newer file's pages
    hwm = len(data) // ps
    newer = meta_page(1, ps, root_new, hwm, 10)
    older = meta_page(0, ps, 2, hwm, 9)  # points at the freelist page: unusable if chosen
    db = BoltDB(_with_metas(data, ps, older, newer))
    assert db.meta.txid == 10 and b"b" in db.root
    broken = bytearray(newer)
    broken[16 + 40] ^= 0xFF  # flip a byte inside the checksummed range
    db = BoltDB(_with_metas(data, ps, meta_page(0, ps, root_new, hwm, 9), bytes(broken)))
    assert db.meta.txid == 9


def test_meta0_damaged_falls_back_to_meta1_any_page_size() -> None:
    data = bytearray(build(TREE, 16384))
    data[0:64] = b"\0" * 64
    db = BoltDB(bytes(data))
    assert db.page_size == 16384 and dump(db.root) == TREE


def test_truncated_file_gives_one_line_error() -> None:
    data = build(TREE, 4096)
    with pytest.raises(BoltError, match="truncated") as info:
        BoltDB(data[: len(data) // 2], "meta.db")
    assert "\n" not in str(info.value)
    with pytest.raises(BoltError, match="not a bbolt"):
        BoltDB(b"", "meta.db")


def test_page_cycle_is_an_error_not_a_hang() -> None:
    ps = 4096
    data = bytearray(build({b"a": b"1"}, ps))
    # Turn the root leaf (page 3) into a branch page pointing at itself.
    struct.pack_into("<QHHI", data, 3 * ps, 3, 0x01, 1, 0)
    struct.pack_into("<IIQ", data, 3 * ps + 16, 16, 1, 3)
    data[3 * ps + 32] = ord("a")
    with pytest.raises(BoltError, match="referenced twice"):
        dump(BoltDB(bytes(data)).root)


def test_open_reads_a_file(tmp_path) -> None:
    path = tmp_path / "meta.db"
    path.write_bytes(build(TREE))
    before = os.stat(path)
    db = BoltDB.open(str(path))
    assert dump(db.root) == TREE
    assert os.stat(path).st_mtime_ns == before.st_mtime_ns


def test_varints() -> None:
    assert read_uvarint(b"\x96\x01") == 150
    assert read_uvarint(b"") is None
    assert read_uvarint(b"\xff" * 11) is None
    assert read_varint(b"\x03") == -2
    assert read_varint(b"\x04") == 2


BASE = build(TREE, 1024, leaf_max=4, fanout=2)


@settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(st.tuples(st.integers(0, len(BASE) - 1), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, len(BASE))),
)
def test_fuzz_corruption_never_crashes(edits: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(BASE)
    for offset, value in edits:
        data[offset] = value
    if cut is not None:
        del data[cut:]
    try:
        db = BoltDB(bytes(data), "fuzz.db")
        dump(db.root)
    except BoltError as exc:
        assert isinstance(exc, PyoverlayError)
        assert "\n" not in str(exc)


@settings(max_examples=150, deadline=1000)
@given(data=st.binary(max_size=5000))
def test_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(BoltError):
        dump(BoltDB(data, "fuzz.db").root)
