"""Micro-benchmark of the lookup hot path: the C helper against the Python reference.

    /tmp/venv/bin/python bench/bench_lookup.py                 # 100,000 entries, 3 rounds
    /tmp/venv/bin/python bench/bench_lookup.py --entries 20000 --rounds 2 --no-mount

Builds a 3-layer tree of N entries (100 merged directories; files, directories,
symlinks, shadowed copies and whiteouts spread over the layers) in a fresh temp dir and
reports, for each implementation:

* lookups/s: ``namei.lookup_child`` on every name of every directory (and on absent
  names), overall and per kind of name;
* merged readdir entries/s: ``readdir.merged_names`` on every directory;
* the end-to-end effect on a cold ``find MERGED -ls`` over a real pyoverlay mount
  (fresh mount, page/dentry caches dropped), native against ``PYOVERLAY_NATIVE=0``.

Rounds alternate between the implementations and the best round counts, so a busy
machine hurts both alike. Mounting needs root; everything mounted is unmounted again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
sys.path[:0] = [REPO, BENCH_DIR]

import mounts  # noqa: E402

from pyoverlay import namei, native, readdir  # noqa: E402
from pyoverlay.layers import LayerStack  # noqa: E402

DIRS = 100
IMPLS = ("native", "python")


class BenchError(Exception):
    """Bad input or an unusable machine: one line, exit status 2."""


# -- the fixture ------------------------------------------------------------------------


def kind_of(i: int) -> str:
    """What entry ``i`` of a directory is; every kind a lookup meets."""
    if i % 50 == 7:
        return "whiteout"  # a copy in l1, hidden by a char 0/0 whiteout in l0
    if i % 100 == 1:
        return "dir"
    if i % 97 == 5:
        return "symlink"
    return ("top", "middle", "bottom")[i % 3] + ("_shadowing" if i % 10 == 0 else "")


def build_tree(root: str, entries: int) -> list[str]:
    """Three lower layers under ``root`` holding ``entries`` names in DIRS directories."""
    layers = [os.path.join(root, f"l{i}") for i in range(3)]
    per_dir = entries // DIRS
    for d in range(DIRS):
        for layer in layers:
            os.makedirs(os.path.join(layer, f"d{d:02d}"))
        for i in range(per_dir):
            _make_entry([os.path.join(layer, f"d{d:02d}") for layer in layers], i)
    return layers


def _make_entry(dirs: list[str], i: int) -> None:
    name = f"entry_{i:05d}"
    kind = kind_of(i)
    if kind == "whiteout":
        _touch(os.path.join(dirs[1], name))
        os.mknod(os.path.join(dirs[0], name), 0o20600, os.makedev(0, 0))
    elif kind == "dir":
        os.mkdir(os.path.join(dirs[i % 3], name))
    elif kind == "symlink":
        os.symlink("target", os.path.join(dirs[i % 3], name))
    else:
        _touch(os.path.join(dirs[i % 3], name))
        if kind.endswith("_shadowing"):
            _touch(os.path.join(dirs[2 if i % 3 < 2 else 1], name))


def _touch(path: str) -> None:
    with open(path, "wb"):
        pass


# -- measuring ----------------------------------------------------------------------------


def best_of(rounds: int, runs: dict[str, Callable[[], int]]) -> dict[str, tuple[float, int]]:
    """Alternate the implementations ``rounds`` times: best seconds and the item count."""
    best: dict[str, tuple[float, int]] = {}
    for _ in range(rounds):
        for impl, run in runs.items():
            native.set_active(impl == "native")
            start = time.perf_counter()
            count = run()
            elapsed = time.perf_counter() - start
            if impl not in best or elapsed < best[impl][0]:
                best[impl] = (elapsed, count)
    return best


def model_benchmarks(layers: list[str], entries: int, rounds: int) -> dict:
    stack = LayerStack(layers, None)
    try:
        root = namei.root(stack)
        dirs = [namei.lookup_child(stack, root, b"d%02d" % d) for d in range(DIRS)]
        per_dir = entries // DIRS
        by_kind: dict[str, list[bytes]] = {}
        for i in range(per_dir):
            by_kind.setdefault(kind_of(i).split("_")[0], []).append(b"entry_%05d" % i)
        by_kind["absent"] = [b"absent_%05d" % i for i in range(per_dir // 10)]
        every = [n for names in by_kind.values() for n in names]

        def lookups(names: list[bytes]) -> Callable[[], int]:
            def run() -> int:
                for d in dirs:
                    for n in names:
                        namei.lookup_child(stack, d, n)
                return len(dirs) * len(names)

            return run

        def primitive() -> int:
            """The C walk alone: fds given, no Resolved built, no fd cache (a ceiling)."""
            lookup = native._native.lookup
            for d in dirs:
                fds = [stack.try_dir_fd(layer, rel) for layer, rel in d.layers]
                xwh = [m.xattr_whiteouts for m in d.markers]
                for n in every:
                    lookup(n, fds, xwh)
            return len(dirs) * len(every)

        def listing() -> int:
            return sum(len(readdir.merged_names(stack, d)) for d in dirs)

        result = {"lookups": _rates(best_of(rounds, dict.fromkeys(IMPLS, lookups(every))))}
        result["lookups_by_kind"] = {
            kind: _rates(best_of(rounds, dict.fromkeys(IMPLS, lookups(names))))
            for kind, names in by_kind.items()
        }
        result["readdir"] = _rates(best_of(rounds, dict.fromkeys(IMPLS, listing)))
        prim = best_of(rounds, {"native": primitive})["native"]
        result["c_primitive_per_s"] = prim[1] / prim[0]
        return result
    finally:
        native.set_active(native.available())
        stack.close()


def _rates(best: dict[str, tuple[float, int]]) -> dict:
    out = {impl: {"per_s": count / secs, "items": count, "seconds": secs}
           for impl, (secs, count) in best.items()}  # fmt: skip
    out["speedup"] = out["native"]["per_s"] / out["python"]["per_s"]
    return out


def find_benchmark(layers: list[str], work: str, rounds: int) -> dict:
    """Cold ``find -ls`` over a fresh mount, native against PYOVERLAY_NATIVE=0."""
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for r in range(rounds):
        for impl in IMPLS:
            times[impl].append(_one_find(layers, os.path.join(work, f"{impl}{r}"), impl))
    out = {impl: {"best_s": min(t), "all_s": t} for impl, t in times.items()}
    out["speedup"] = out["python"]["best_s"] / out["native"]["best_s"]
    return out


def _one_find(layers: list[str], base: str, impl: str) -> float:
    paths = mounts.Layers(layers, f"{base}/upper", f"{base}/work", f"{base}/merged")
    for path in (paths.upper, paths.work, paths.merged):
        os.makedirs(path)
    saved = os.environ.get("PYOVERLAY_NATIVE")
    os.environ["PYOVERLAY_NATIVE"] = "1" if impl == "native" else "0"  # the daemon inherits it
    try:
        mount = mounts.mount_pyoverlay(paths, f"{base}.log", sys.executable, REPO)
    finally:
        if saved is None:
            os.environ.pop("PYOVERLAY_NATIVE")
        else:
            os.environ["PYOVERLAY_NATIVE"] = saved
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        start = time.perf_counter()
        subprocess.run(
            ["find", paths.merged, "-ls"], check=True, stdout=subprocess.DEVNULL, timeout=1800
        )
        return time.perf_counter() - start
    finally:
        mount.unmount()


# -- the command ----------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/bench_lookup.py", description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=100_000, help="names in the tree")
    p.add_argument("--rounds", type=int, default=3, help="rounds per measurement (best counts)")
    p.add_argument("--no-mount", action="store_true", help="skip the find -ls over a mount")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = p.parse_args(argv)
    if not DIRS <= args.entries <= 5_000_000:
        raise BenchError(f"--entries {args.entries}: expected {DIRS} .. 5000000")
    if not 1 <= args.rounds <= 50:
        raise BenchError(f"--rounds {args.rounds}: expected 1 .. 50")
    if not native.available():
        raise BenchError("pyoverlay._native is not built (pip install -e .) or PYOVERLAY_NATIVE=0")
    if not args.no_mount and os.geteuid() != 0:
        raise BenchError("the find -ls measurement mounts: run as root, or pass --no-mount")
    return args


def report(results: dict) -> str:
    lines = [f"3 layers, {results['entries']:,} entries in {DIRS} merged directories"]

    def row(label: str, r: dict, unit: str) -> str:
        n, p, x = r["native"]["per_s"], r["python"]["per_s"], r["speedup"]
        return f"  {label:<22} native {n:>12,.0f} {unit}  python {p:>12,.0f} {unit}  x{x:.2f}"

    lines.append(row("lookups (all)", results["lookups"], "/s"))
    for kind, r in results["lookups_by_kind"].items():
        lines.append(row(f"  {kind}", r, "/s"))
    lines.append(f"  {'C walk alone':<22} native {results['c_primitive_per_s']:>12,.0f} /s"
                 "  (no Resolved, no fd cache: the ceiling)")  # fmt: skip
    lines.append(row("readdir entries", results["readdir"], "/s"))
    if "find" in results:
        f = results["find"]
        lines.append(
            f"  cold find -ls          native {f['native']['best_s']:.2f} s"
            f"  python {f['python']['best_s']:.2f} s  x{f['speedup']:.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except BenchError as exc:
        print(f"bench_lookup: {exc}", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="pyoverlay-bench-lookup-", dir="/var/tmp")
    try:
        layers = build_tree(os.path.join(tmp, "layers"), args.entries)
        results = {"entries": args.entries}
        results |= model_benchmarks(layers, args.entries, args.rounds)
        if not args.no_mount:
            results["find"] = find_benchmark(layers, os.path.join(tmp, "mnt"), min(args.rounds, 2))
        print(report(results))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return 0
    except (OSError, mounts.MountError, subprocess.SubprocessError) as exc:
        print(f"bench_lookup: {exc}", file=sys.stderr)
        return 1
    finally:
        mounts.unmount_all()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
