"""Throughput of ``pyoverlay containerd verify`` in MB/s of uncompressed layer data.

Builds one deterministic layer (big, medium and small files, part random, part
compressible), stores it as gzip, zstd and plain blobs, unpacks it once as containerd
would, and times the per-layer comparison (blob digest, diff_id, every entry against the
directory) pinned to one CPU, best of ``--repeat`` runs. The page cache is warm: this
measures our CPU cost. Wall-clock MB/s is the target; MB/s of CPU time is printed too
because on a shared machine the wall clock also counts other processes' time.
``--root DIR`` instead times ``verify --all`` over a real containerd root.

    python bench/bench_verify.py [--size-mb 256] [--compression gzip,zstd,plain]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyoverlay.containerd.store import ContainerdRoot
from pyoverlay.containerd.tarlayer import BlobStream
from pyoverlay.containerd.verify import LayerCheck, verify_image

MB = 1_000_000


def _content(rng: random.Random, size: int) -> bytes:
    """Half random, half repetitive text: compresses roughly like real binaries."""
    half = size // 2
    text = b"the quick brown fox jumps over the lazy dog %d\n" % rng.randrange(1000)
    return rng.randbytes(half) + (text * (size // len(text) + 1))[: size - half]


MIXES = {"mixed": (4, 4, 2), "small": (0, 0, 10)}


def build_layer(size: int, seed: int = 7, mix: str = "mixed") -> bytes:
    """An uncompressed layer tar of about ``size`` bytes of file content.

    ``mix`` "mixed" puts 40/40/20 % of the bytes in big/medium/small files; "small" puts
    everything in 0.5-16 KB files, the worst case for per-entry cost.
    """
    rng = random.Random(seed)
    buf = io.BytesIO()
    shares = MIXES[mix]
    budget = {
        name: size * share // 10
        for name, share in zip(("big", "medium", "small"), shares, strict=True)
    }
    ranges = {"big": (4 << 20, 32 << 20), "medium": (64 << 10, 1 << 20), "small": (512, 16 << 10)}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for group, left in budget.items():
            n = 0
            while left > 0:
                if n % 50 == 0:
                    d = tarfile.TarInfo(f"{group}/d{n // 50}")
                    d.type, d.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(d)
                low, high = ranges[group]
                length = min(left, rng.randrange(low, high))
                info = tarfile.TarInfo(f"{group}/d{n // 50}/f{n}")
                info.size, info.mode, info.mtime = length, 0o644, 1_700_000_000
                tar.addfile(info, io.BytesIO(_content(rng, length)))
                left -= length
                n += 1
    return buf.getvalue()


def compress(raw: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(raw, compresslevel=6, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(raw)
    return raw


def time_layer(blob: Path, fs: Path) -> tuple[float, float, int, int]:
    """(wall s, cpu s, uncompressed bytes, findings) for one layer check."""
    wall, cpu = time.perf_counter(), time.process_time()
    stream = BlobStream(str(blob))
    try:
        findings, error = LayerCheck(stream, str(fs), True, lambda _n: None).run()
        stream.drain()
        stream.drain_file()
    finally:
        stream.close()
    if error:
        raise SystemExit(f"bench layer failed to decode: {error}")
    return time.perf_counter() - wall, time.process_time() - cpu, stream.count, len(findings)


def bench_synthetic(args: argparse.Namespace) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="bench-verify-", dir=args.dir))
    try:
        raw = build_layer(args.size_mb * MB, mix=args.mix)
        fs = work / "fs"
        fs.mkdir()
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            tar.extractall(fs, filter="fully_trusted")
        results = []
        for how in args.compression.split(","):
            blob = work / f"blob.{how}"
            blob.write_bytes(compress(raw, how))
            best = None
            for _ in range(args.repeat):
                wall, cpu, count, findings = time_layer(blob, fs)
                if findings:
                    raise SystemExit(f"bench layer has {findings} findings: the unpack is wrong")
                if best is None or wall < best[0]:
                    best = (wall, cpu, count)
            wall, cpu, count = best
            results.append(
                {
                    "compression": how,
                    "mix": args.mix,
                    "uncompressed_mb": round(count / MB, 1),
                    "blob_mb": round(blob.stat().st_size / MB, 1),
                    "seconds": round(wall, 3),
                    "cpu_seconds": round(cpu, 3),
                    "mb_per_s": round(count / MB / wall, 1),
                    "mb_per_cpu_s": round(count / MB / cpu, 1) if cpu else None,
                }
            )
            blob.unlink()
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_root(root_dir: str) -> list[dict]:
    root = ContainerdRoot(root_dir)
    done: dict[int, str] = {}
    wall, total, problems = time.perf_counter(), 0, 0
    for namespace in root.search_order(None):
        for image in root.images(namespace):
            result = verify_image(root, image, done)
            total += sum(r.uncompressed for r in result.layers)
            problems += result.problems
    wall = time.perf_counter() - wall
    return [
        {
            "root": root_dir,
            "uncompressed_mb": round(total / MB, 1),
            "seconds": round(wall, 3),
            "mb_per_s": round(total / MB / wall, 1) if wall else None,
            "problems": problems,
        }
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256, help="layer content size")
    parser.add_argument("--compression", default="gzip,zstd,plain")
    parser.add_argument("--mix", choices=sorted(MIXES), default="mixed", help="file sizes")
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs")
    parser.add_argument("--cpu", type=int, default=0, help="CPU to pin to")
    parser.add_argument("--dir", default=None, help="where to build the layer")
    parser.add_argument("--root", help="time verify --all over this containerd root instead")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    results = bench_root(args.root) if args.root else bench_synthetic(args)
    if args.json:
        print(json.dumps(results, indent=2))
    for r in results if not args.json else []:
        label = f"{r['compression']} {r['mix']}" if "compression" in r else r["root"]
        print(
            f"verify {label:<12} {r['uncompressed_mb']:8.1f} MB uncompressed in "
            f"{r['seconds']:7.3f} s: {r['mb_per_s']} MB/s wall on one core"
            + (f", {r['mb_per_cpu_s']} MB/s of CPU time" if r.get("mb_per_cpu_s") else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
