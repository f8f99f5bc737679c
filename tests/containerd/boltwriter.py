"""A minimal bbolt file writer for tests: builds valid files with chosen page sizes.

It exists only to feed the reader known structures (inline buckets, overflow pages,
branch pages, any page size); containerd's own files are tested in the integration tests.
"""

from __future__ import annotations

import struct

from pyoverlay.containerd.bolt import BUCKET_HEADER, LEAF_ELEM, MAGIC, PAGE_HEADER, fnv1a64

Tree = dict  # bytes -> bytes | Tree


class BoltWriter:
    """Lays out a nested dict as bbolt pages."""

    def __init__(self, page_size: int = 4096, leaf_max: int = 8, fanout: int = 4) -> None:
        self.page_size, self.leaf_max, self.fanout = page_size, leaf_max, fanout
        self.pages: dict[int, bytes] = {}
        self.next_pgid = 3  # 0, 1: meta; 2: freelist

    def _alloc(self, body: bytes) -> int:
        pgid = self.next_pgid
        npages = max(1, -(-len(body) // self.page_size))
        self.pages[pgid] = body.ljust(npages * self.page_size, b"\0")
        self.next_pgid += npages
        return pgid

    @staticmethod
    def _leaf_bytes(pgid: int, items: list[tuple[bytes, bytes, int]], overflow: int = 0) -> bytes:
        head = PAGE_HEADER.pack(pgid, 0x02, len(items), overflow)
        elems, data = b"", b""
        base = PAGE_HEADER.size + LEAF_ELEM.size * len(items)
        for i, (key, value, flags) in enumerate(items):
            pos = base + len(data) - (PAGE_HEADER.size + i * LEAF_ELEM.size)
            elems += LEAF_ELEM.pack(flags, pos, len(key), len(value))
            data += key + value
        return head + elems + data

    def _place(self, body_for) -> int:
        """Allocate a page whose header must know its own id and overflow."""
        pgid = self.next_pgid
        body = body_for(pgid, 0)
        overflow = max(1, -(-len(body) // self.page_size)) - 1
        return self._alloc(body_for(pgid, overflow))

    def _items(self, tree: Tree) -> list[tuple[bytes, bytes, int]]:
        items = []
        for key in sorted(tree):
            value = tree[key]
            if isinstance(value, dict):
                items.append((key, self.bucket_value(value), 1))
            else:
                items.append((key, value, 0))
        return items

    def bucket_value(self, tree: Tree) -> bytes:
        items = self._items(tree)
        small = sum(len(k) + len(v) + 16 for k, v, _ in items) + 16 < self.page_size // 4
        if small and not any(flags for _, _, flags in items):
            return BUCKET_HEADER.pack(0, 0) + self._leaf_bytes(0, items)
        return BUCKET_HEADER.pack(self._tree_pages(items), 0)

    def _tree_pages(self, items: list[tuple[bytes, bytes, int]]) -> int:
        level: list[tuple[bytes, int]] = []
        chunks = [items[i : i + self.leaf_max] for i in range(0, len(items), self.leaf_max)]
        for chunk in chunks or [[]]:
            pgid = self._place(lambda p, o, c=chunk: self._leaf_bytes(p, c, o))
            level.append((chunk[0][0] if chunk else b"", pgid))
        while len(level) > 1:
            groups = [level[i : i + self.fanout] for i in range(0, len(level), self.fanout)]
            level = [
                (g[0][0], self._place(lambda p, o, g=g: self._branch(p, g, o))) for g in groups
            ]
        return level[0][1]

    @staticmethod
    def _branch(pgid: int, children: list[tuple[bytes, int]], overflow: int) -> bytes:
        head = PAGE_HEADER.pack(pgid, 0x01, len(children), overflow)
        elems, data = b"", b""
        base = PAGE_HEADER.size + 16 * len(children)
        for i, (key, child) in enumerate(children):
            pos = base + len(data) - (PAGE_HEADER.size + i * 16)
            elems += struct.pack("<IIQ", pos, len(key), child)
            data += key
        return head + elems + data

    def build(self, tree: Tree, txid: int = 7) -> bytes:
        root = self._tree_pages(self._items(tree))  # the root bucket is never inline
        ps = self.page_size
        out = bytearray(self.next_pgid * ps)
        for pgid, body in self.pages.items():
            out[pgid * ps : pgid * ps + len(body)] = body
        for meta_id, meta_txid in ((0, txid - 1), (1, txid)):
            out[meta_id * ps : meta_id * ps + ps] = meta_page(
                meta_id, ps, root, self.next_pgid, meta_txid
            )
        out[2 * ps : 2 * ps + PAGE_HEADER.size] = PAGE_HEADER.pack(2, 0x10, 0, 0)
        return bytes(out)


def meta_page(pgid: int, page_size: int, root: int, high_water: int, txid: int) -> bytes:
    body = struct.pack("<IIIIQQQQQ", MAGIC, 2, page_size, 0, root, 0, 2, high_water, txid)
    body += struct.pack("<Q", fnv1a64(body))
    return (PAGE_HEADER.pack(pgid, 0x04, 0, 0) + body).ljust(page_size, b"\0")


def build(tree: Tree, page_size: int = 4096, leaf_max: int = 8, fanout: int = 4) -> bytes:
    """A complete bbolt file holding ``tree``."""
    return BoltWriter(page_size, leaf_max, fanout).build(tree)
