"""The workloads: what is timed on each target, and how each is prepared and undone.

A workload's ``run`` returns its metrics ("seconds" for timed ones) and times only the
part that is being measured; preparation (warming caches, reading the source of a
copy-up) happens in ``prepare``. Overlay targets get a fresh upper layer for every
measurement; the plain target is shared, so workloads that change it have an ``undo``.

Run as a script (``workloads.py statloop ROOT LIST OUT``) this module is the second
process that stats files while a copy-up runs.
"""

from __future__ import annotations

import array
import math
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

READ_CHUNK = 1 << 20
PAGE = 4096
FUSE_ONLY = ("fuse-overlayfs", "pyoverlay")
OVERLAYS = ("kernel", "fuse-overlayfs", "pyoverlay")
ALL = ("kernel", "fuse-overlayfs", "pyoverlay", "plain")
FORGET_SETTLE_S = 2.0


@dataclass
class Context:
    """One measurement: the target's root, the fixture, and the daemon pid if any."""

    root: str
    fx: object  # fixtures.Fixture (kept loose so the statloop child imports nothing)
    daemon_pid: int | None = None

    def at(self, rel: str) -> str:
        return os.path.join(self.root, rel)


Metrics = dict[str, float]


@dataclass(frozen=True)
class Workload:
    name: str
    label: str
    run: Callable[[Context], Metrics]
    prepare: Callable[[Context], None] | None = None
    undo: Callable[[Context], None] | None = None
    cold: bool = False
    kind: str = "time"  # "time", "memory" or "latency"
    stack: str = "main"  # which layer stack of the fixture it mounts
    targets: tuple[str, ...] = ALL


def drop_caches(level: int = 3) -> None:
    """1: page cache, 2: dentries and inodes (FUSE then sends FORGETs), 3: both."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write(str(level))


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# --- tree walks --------------------------------------------------------------------------


def walk_lstat(root: str) -> int:
    """Visit every entry below root with scandir, lstat each one; returns the count."""
    count, stack = 0, [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                st = os.lstat(entry.path)
                count += 1
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return count


def _walk(ctx: Context) -> Metrics:
    seconds, count = timed(lambda: walk_lstat(ctx.root))
    return {"seconds": seconds, "entries": float(count)}


def _walk_prepare(ctx: Context) -> None:
    walk_lstat(ctx.root)


def _readdir(ctx: Context) -> Metrics:
    seconds, names = timed(lambda: os.listdir(ctx.at(ctx.fx.bigdir)))
    return {"seconds": seconds, "entries": float(len(names))}


# --- lookups -----------------------------------------------------------------------------


def _negative_prepare(ctx: Context) -> None:
    for d in ctx.fx.tree_dirs:
        os.lstat(ctx.at(d))


def _negative(ctx: Context) -> Metrics:
    dirs = [ctx.at(d) for d in ctx.fx.tree_dirs]
    n = ctx.fx.sizes.negative_lookups
    names = [f"{dirs[i % len(dirs)]}/absent-{i:06d}.c" for i in range(n)]

    def lookups() -> int:
        misses = 0
        for path in names:
            try:
                os.lstat(path)
            except FileNotFoundError:
                misses += 1
        return misses

    seconds, misses = timed(lookups)
    if misses != n:
        raise RuntimeError(f"{n - misses} of the absent names were found")
    return {"seconds": seconds, "lookups": float(n)}


# --- reads -------------------------------------------------------------------------------


def read_all(path: str) -> int:
    buf = bytearray(READ_CHUNK)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def _seq_read(ctx: Context) -> Metrics:
    seconds, total = timed(lambda: read_all(ctx.at(ctx.fx.big_file)))
    expected = ctx.fx.sizes.big_file_mib << 20
    if total != expected:
        raise RuntimeError(f"read {total} bytes of a {expected}-byte file")
    return {"seconds": seconds, "mib_per_s": expected / (1 << 20) / seconds}


def _warm_big(ctx: Context) -> None:
    read_all(ctx.at(ctx.fx.big_file))


def _random_read(ctx: Context) -> Metrics:
    pages = (ctx.fx.sizes.big_file_mib << 20) // PAGE
    rng = random.Random(4096)
    offsets = [rng.randrange(pages) * PAGE for _ in range(ctx.fx.sizes.random_reads)]

    def reads() -> None:
        fd = os.open(ctx.at(ctx.fx.big_file), os.O_RDONLY)
        try:
            for off in offsets:
                if len(os.pread(fd, PAGE, off)) != PAGE:
                    raise RuntimeError(f"short read at {off}")
        finally:
            os.close(fd)

    seconds, _ = timed(reads)
    return {"seconds": seconds, "reads": float(len(offsets))}


# --- writes ------------------------------------------------------------------------------


def first_write(path: str) -> float:
    """Seconds from open(O_WRONLY|O_APPEND) until a 1-byte write returns."""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"x")
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
    return seconds


def _copyup(ctx: Context) -> Metrics:
    return {"seconds": first_write(ctx.at(ctx.fx.big_file))}


def _copyup_undo(ctx: Context) -> None:
    os.truncate(ctx.at(ctx.fx.big_file), ctx.fx.sizes.big_file_mib << 20)


def _chmod(ctx: Context) -> Metrics:
    paths = [ctx.at(p) for p in ctx.fx.chmod_paths]

    def chmods() -> None:
        for p in paths:
            os.chmod(p, 0o600)

    seconds, _ = timed(chmods)
    return {"seconds": seconds, "files": float(len(paths))}


def _chmod_undo(ctx: Context) -> None:
    for p in ctx.fx.chmod_paths:
        os.chmod(ctx.at(p), 0o644)


def _create_fsync_unlink(ctx: Context) -> Metrics:
    base = ctx.at(ctx.fx.create_dir)
    paths = [f"{base}/cfu-{i:05d}.tmp" for i in range(ctx.fx.sizes.create_files)]
    payload = b"c" * 128

    def churn() -> None:
        for p in paths:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
        for p in paths:
            os.unlink(p)

    seconds, _ = timed(churn)
    return {"seconds": seconds, "files": float(len(paths))}


UNTAR_DEST = "untar-dest"


def _untar(ctx: Context) -> Metrics:
    dest = ctx.at(UNTAR_DEST)
    os.mkdir(dest)
    cmd = ["tar", "-xf", ctx.fx.tarball, "-C", dest]
    seconds, res = timed(lambda: subprocess.run(cmd, capture_output=True, text=True))
    if res.returncode != 0:
        raise RuntimeError(f"tar -x failed: {res.stderr.strip()[-200:]}")
    return {"seconds": seconds, "files": float(ctx.fx.sizes.tar_files)}


def _untar_undo(ctx: Context) -> None:
    shutil.rmtree(ctx.at(UNTAR_DEST), ignore_errors=True)


def _tar_prepare(ctx: Context) -> None:
    # The first lookups on a fresh upper make the kernel add origin/impure xattrs to its
    # directories, changing their ctime; tar would call that "file changed as we read it".
    walk_lstat(ctx.root)
    _tar(ctx)


def _tar(ctx: Context) -> Metrics:
    # Through a pipe: with -f /dev/null GNU tar notices and skips reading file data.
    cmd = 'set -o pipefail; tar -cf - -C "$1" . | cat > /dev/null'
    args = ["bash", "-c", cmd, "bench-tar", ctx.root]
    seconds, res = timed(lambda: subprocess.run(args, capture_output=True, text=True))
    if res.returncode != 0:
        raise RuntimeError(f"tar -c failed: {res.stderr.strip()[-200:]}")
    return {"seconds": seconds}


# --- daemon memory -----------------------------------------------------------------------


def vm_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _rss(ctx: Context) -> Metrics:
    if ctx.daemon_pid is None:
        raise RuntimeError("no daemon pid for this target")
    before = vm_rss_mib(ctx.daemon_pid)
    entries = walk_lstat(ctx.root)
    after_walk = vm_rss_mib(ctx.daemon_pid)
    drop_caches(2)
    time.sleep(FORGET_SETTLE_S)  # FORGETs are queued to the daemon asynchronously
    after_forget = vm_rss_mib(ctx.daemon_pid)
    return {
        "rss_mounted_mib": before,
        "rss_after_walk_mib": after_walk,
        "rss_after_forget_mib": after_forget,
        "entries": float(entries),
    }


# --- stat latency during a copy-up -------------------------------------------------------


def _copyup_latency(ctx: Context) -> Metrics:
    out = os.path.join(os.path.dirname(ctx.fx.root), f"statloop-{os.getpid()}.bin")
    cmd = [sys.executable, os.path.abspath(__file__), "statloop", ctx.root, ctx.fx.statlist, out]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("stat loop did not start")
        time.sleep(0.02)  # let the loop start, but begin while its first pass is cold
        t0 = time.monotonic()
        first = first_write(ctx.at(ctx.fx.huge_file))
        t1 = time.monotonic()
        time.sleep(0.05)
        child.send_signal(signal.SIGUSR1)
        child.wait(timeout=60)
        samples = array.array("d")
        with open(out, "rb") as f:
            samples.frombytes(f.read())
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if os.path.exists(out):
            os.unlink(out)
    with open(ctx.fx.statlist) as f:
        npaths = sum(1 for line in f if line.strip())
    pairs = zip(samples[0::2], samples[1::2], strict=True)
    inside = [(i, d) for i, (s, d) in enumerate(pairs) if s < t1 and s + d > t0]
    if not inside:
        raise RuntimeError("no stat finished during the copy-up")
    window = sorted(d for _, d in inside)
    # The first stat of each path cannot be answered from the kernel's caches.
    uncached = sorted(d for i, d in inside if i < npaths)
    metrics = {
        "p99_ms": quantile(window, 0.99) * 1000,
        "max_ms": window[-1] * 1000,
        "samples": float(len(window)),
        "uncached_samples": float(len(uncached)),
        "copyup_s": first,
    }
    if uncached:
        metrics["p99_uncached_ms"] = quantile(uncached, 0.99) * 1000
    return metrics


def quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted list."""
    rank = max(1, min(len(sorted_values), math.ceil(q * len(sorted_values))))
    return sorted_values[rank - 1]


def statloop_main(root: str, listfile: str, out: str) -> int:
    """Stat files round-robin until SIGUSR1, then write (start, seconds) pairs to out."""
    with open(listfile) as f:
        paths = [os.path.join(root, line.rstrip("\n")) for line in f if line.strip()]
    stop = False

    def on_signal(_signo, _frame) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGUSR1, on_signal)
    samples = array.array("d")
    clock = time.monotonic
    print("ready", flush=True)
    i = 0
    while not stop:
        path = paths[i % len(paths)]
        start = clock()
        os.lstat(path)
        samples.append(start)
        samples.append(clock() - start)
        i += 1
    with open(out, "wb") as f:
        samples.tofile(f)
    return 0


WORKLOADS: tuple[Workload, ...] = (
    Workload("walk_cold", "cold tree walk with lstat ({merged_entries} entries)", _walk, cold=True),
    Workload("walk_warm", "warm tree walk with lstat", _walk, prepare=_walk_prepare),
    Workload(
        "readdir_cold",
        "cold readdir of a {bigdir_entries:,}-entry merged directory",
        _readdir,
        cold=True,
    ),
    Workload(
        "negative_lookups",
        "{negative_lookups:,} negative lookups",
        _negative,
        prepare=_negative_prepare,
    ),
    Workload("seq_read_cold", "sequential {big_file_mib} MiB read, cold", _seq_read, cold=True),
    Workload(
        "seq_read_warm", "sequential {big_file_mib} MiB read, warm", _seq_read, prepare=_warm_big
    ),
    Workload(
        "rand_read_cold", "{random_reads:,} random 4 KiB reads, cold", _random_read, cold=True
    ),
    Workload(
        "rand_read_warm",
        "{random_reads:,} random 4 KiB reads, warm",
        _random_read,
        prepare=_warm_big,
    ),
    Workload(
        "copyup_ttfw",
        "copy-up time-to-first-write, {big_file_mib} MiB file",
        _copyup,
        prepare=_warm_big,
        undo=_copyup_undo,
    ),
    Workload("chmod_lower", "chmod of {chmod_files:,} lower files", _chmod, undo=_chmod_undo),
    Workload(
        "create_fsync_unlink", "create+fsync+unlink of {create_files:,} files", _create_fsync_unlink
    ),
    Workload("untar", "untar of a source tree ({tar_files:,} files)", _untar, undo=_untar_undo),
    Workload("tar_warm", "tar of the whole tree, warm", _tar, prepare=_tar_prepare),
    Workload(
        "daemon_rss",
        "daemon RSS, walk of {rss_entries:,} entries",
        _rss,
        kind="memory",
        stack="rss",
        targets=FUSE_ONLY,
    ),
    Workload(
        "copyup_stat_p99",
        "stat p99 during copy-up of {huge_file_mib} MiB",
        _copyup_latency,
        cold=True,
        kind="latency",
        stack="huge",
        targets=OVERLAYS,
    ),
)

BY_NAME = {w.name: w for w in WORKLOADS}


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "statloop":
        sys.exit(statloop_main(*sys.argv[2:]))
    print("usage: workloads.py statloop ROOT LISTFILE OUT", file=sys.stderr)
    sys.exit(2)
