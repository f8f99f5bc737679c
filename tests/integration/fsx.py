"""An fsx/fsstress-like exerciser: many processes, random operations, data checked.

Owns the workload of the concurrency test and its soak mode. Worker processes pick
random operations on a small set of shared names (so they collide): pwrite, append,
truncate, mmap reads and writes, renames, hard links, unlinks, creates. Each operation
runs on the mount and, identically, on a shadow tree on a plain file system under
per-name locks (flock on files outside the mount); the errno of both must agree, and the
file read back through the mount (by read(2) or mmap) must equal the shadow copy.
Other names are read-only big lower files that workers read without locks while others
trigger their copy-up: their content must never change.

Run as ``python fsx.py --merged M --shadow S --work-dir D --procs N --ops K --seed X``;
:func:`run_with_watchdog` starts that and ends it (and aborts the FUSE connection) if
the workers stop making progress: a hang in the daemon fails the test instead of it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

DIRS = ("a", "b")
NAMES = tuple(f"{d}/f{i}" for d in DIRS for i in range(5))
#: Names that exist in the lower layers at the start (first writes copy them up).
LOWER_NAMES = NAMES[::2]
RO_NAMES = tuple(f"ro/big{i}" for i in range(3))
RO_SIZE = 3 << 20
MAX_SIZE = 192 << 10
PROGRESS_EVERY = 5


def ro_data(i: int) -> bytes:
    return random.Random(f"ro{i}").randbytes(RO_SIZE)


def lower_data(name: str) -> bytes:
    return random.Random(name).randbytes(48 << 10)


def populate(lowers: list[Path], shadow: Path) -> None:
    """Fill two lowers (dirs merged from both) and the shadow copy of the merged view."""
    top, bottom = lowers
    for d in DIRS:
        for root in (top, bottom, shadow):
            (root / d).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(LOWER_NAMES):
        layer = top if i % 2 else bottom
        (layer / name).write_bytes(lower_data(name))
        (shadow / name).write_bytes(lower_data(name))
    (bottom / "ro").mkdir(exist_ok=True)
    for i, name in enumerate(RO_NAMES):
        (bottom / name).write_bytes(ro_data(i))


class Failure(Exception):
    """Wrong data or a different answer from the mount than from the shadow."""


# -- locking -----------------------------------------------------------------------------


class Locks:
    """One flock file per name, taken in sorted order (no deadlock among workers)."""

    def __init__(self, lock_dir: Path, shadow: Path):
        self.dir = lock_dir
        self.shadow = shadow
        self.fds = {
            n: os.open(lock_dir / n.replace("/", "_"), os.O_RDWR | os.O_CREAT, 0o600) for n in NAMES
        }

    def group(self, name: str) -> set[str]:
        """Every name that is the same inode as ``name`` in the shadow."""
        try:
            ino = os.lstat(self.shadow / name).st_ino
        except FileNotFoundError:
            return {name}
        found = {name}
        for other in NAMES:
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(self.shadow / other).st_ino == ino:
                    found.add(other)
        return found

    @contextlib.contextmanager
    def hold(self, *names: str) -> Iterator[None]:
        """Lock ``names`` and every name linked to them, stable while held."""
        while True:
            wanted = set().union(*(self.group(n) for n in names))
            for n in sorted(wanted):
                fcntl.flock(self.fds[n], fcntl.LOCK_EX)
            # A link or rename may have changed the groups before we held them all.
            if set().union(*(self.group(n) for n in names)) <= wanted:
                break
            self._release(wanted)
        try:
            yield
        finally:
            self._release(wanted)

    def _release(self, names: set[str]) -> None:
        for n in sorted(names, reverse=True):
            fcntl.flock(self.fds[n], fcntl.LOCK_UN)


# -- operations --------------------------------------------------------------------------


def _both(merged: Path, shadow: Path, what: str, fn: Callable[[Path], object]) -> object:
    """Run ``fn`` on the mount and on the shadow; their errnos (or results) must agree."""
    results = []
    for root in (merged, shadow):
        try:
            results.append(("ok", fn(root)))
        except OSError as exc:
            results.append(("err", errno.errorcode.get(exc.errno or 0, exc.errno)))
    if results[0] != results[1]:
        raise Failure(f"{what}: mount gave {results[0]}, plain file system {results[1]}")
    return results[0][1]


def _pwrite(root: Path, name: str, off: int, data: bytes, append: bool) -> int:
    flags = os.O_WRONLY | (os.O_APPEND if append else 0)
    fd = os.open(root / name, flags)
    try:
        return os.write(fd, data) if append else os.pwrite(fd, data, off)
    finally:
        os.close(fd)


def _mmap_write(root: Path, name: str, off: int, data: bytes) -> int:
    fd = os.open(root / name, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        off %= size
        data = data[: size - off]
        with mmap.mmap(fd, size) as m:
            m[off : off + len(data)] = data
            m.flush()
        return len(data)
    finally:
        os.close(fd)


def _read_all(root: Path, name: str, use_mmap: bool) -> bytes:
    fd = os.open(root / name, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if use_mmap and size:
            with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
                return bytes(m)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _create(root: Path, name: str, data: bytes) -> int:
    fd = os.open(root / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


class Worker:
    def __init__(self, merged: Path, shadow: Path, locks: Locks, rng: random.Random):
        self.merged, self.shadow, self.locks, self.rng = merged, shadow, locks, rng
        self.counts: dict[str, int] = {}

    def step(self) -> None:
        kind = self.rng.choice(
            ["write"] * 4
            + ["append", "truncate", "truncate", "mmap_write", "mmap_write"]
            + ["read", "mmap_read", "rename", "rename", "link", "link", "unlink", "create"]
            + ["mkdir", "mkdir", "rmdir", "rmdir"]
            + ["ro_read", "ro_copy_up", "ro_mmap"]
        )
        self.counts[kind] = self.counts.get(kind, 0) + 1
        getattr(self, "op_" + kind)()

    def _data(self) -> bytes:
        return self.rng.randbytes(self.rng.choice([1, 100, 4096, 5000, 40000]))

    def _check(self, name: str) -> None:
        """The mount's copy of ``name`` equals the shadow's (caller holds the lock)."""
        use_mmap = self.rng.random() < 0.3
        if not _both(self.merged, self.shadow, f"lstat {name}", lambda r: _exists(r / name)):
            return
        if _both(self.merged, self.shadow, f"isdir {name}", lambda r: (r / name).is_dir()):
            return  # an (empty) directory: nothing more to compare
        _both(self.merged, self.shadow, f"size {name}", lambda r: os.stat(r / name).st_size)
        mine = _read_all(self.merged, name, use_mmap)
        want = _read_all(self.shadow, name, False)
        if mine != want:
            first = next(
                (i for i, (x, y) in enumerate(zip(mine, want, strict=False)) if x != y),
                min(len(mine), len(want)),
            )
            raise Failure(
                f"{name}: {len(mine)} bytes read{' by mmap' if use_mmap else ''}, "
                f"{len(want)} expected; first difference at {first}"
            )

    def _file_op(self, what: str, fn: Callable[[Path, str], object]) -> None:
        name = self.rng.choice(NAMES)
        with self.locks.hold(name):
            _both(self.merged, self.shadow, f"{what} {name}", lambda r: fn(r, name))
            self._check(name)

    def op_write(self) -> None:
        off = self.rng.randrange(MAX_SIZE - 40000)
        data = self._data()
        self._file_op("pwrite", lambda r, n: _pwrite(r, n, off, data, append=False))

    def op_append(self) -> None:
        data = self._data()
        name = self.rng.choice(NAMES)
        with self.locks.hold(name):
            if _size(self.shadow, name) < MAX_SIZE - 40000:
                _both(
                    self.merged,
                    self.shadow,
                    f"append {name}",
                    lambda r: _pwrite(r, name, 0, data, append=True),
                )
            self._check(name)

    def op_truncate(self) -> None:
        size = self.rng.randrange(MAX_SIZE)
        self._file_op("truncate", lambda r, n: os.truncate(r / n, size))

    def op_mmap_write(self) -> None:
        off = self.rng.randrange(MAX_SIZE)
        data = self._data()
        self._file_op("mmap write", lambda r, n: _mmap_write(r, n, off, data))

    def op_read(self) -> None:
        self._file_op("read", lambda r, n: None)

    op_mmap_read = op_read  # _check reads by mmap part of the time

    def op_create(self) -> None:
        data = self._data()
        self._file_op("create", lambda r, n: _create(r, n, data))

    def op_mkdir(self) -> None:
        name = self.rng.choice(NAMES)
        with self.locks.hold(name):
            _both(self.merged, self.shadow, f"mkdir {name}", lambda r: os.mkdir(r / name))

    def op_rmdir(self) -> None:
        name = self.rng.choice(NAMES)
        with self.locks.hold(name):
            _both(self.merged, self.shadow, f"rmdir {name}", lambda r: os.rmdir(r / name))

    def op_unlink(self) -> None:
        name = self.rng.choice(NAMES)
        with self.locks.hold(name):
            _both(self.merged, self.shadow, f"unlink {name}", lambda r: os.unlink(r / name))

    def op_rename(self) -> None:
        src, dst = self.rng.choice(NAMES), self.rng.choice(NAMES)
        with self.locks.hold(src, dst):
            _both(
                self.merged,
                self.shadow,
                f"rename {src} {dst}",
                lambda r: os.rename(r / src, r / dst),
            )
            self._check(dst)
            if src != dst:
                _both(self.merged, self.shadow, f"lstat {src}", lambda r: _exists(r / src))

    def op_link(self) -> None:
        src, dst = self.rng.choice(NAMES), self.rng.choice(NAMES)
        with self.locks.hold(src, dst):
            _both(
                self.merged, self.shadow, f"link {src} {dst}", lambda r: os.link(r / src, r / dst)
            )
            self._check(dst)

    # Read-only big lower files: no locks, content fixed, copy-ups racing with readers.

    def _ro(self) -> tuple[str, bytes]:
        i = self.rng.randrange(len(RO_NAMES))
        return RO_NAMES[i], ro_data(i)

    def op_ro_read(self) -> None:
        name, want = self._ro()
        if _read_all(self.merged, name, False) != want:
            raise Failure(f"{name}: content changed (read)")

    def op_ro_mmap(self) -> None:
        name, want = self._ro()
        if _read_all(self.merged, name, True) != want:
            raise Failure(f"{name}: content changed (mmap)")

    def op_ro_copy_up(self) -> None:
        name, want = self._ro()
        fd = os.open(self.merged / name, os.O_RDWR)  # forces a copy-up
        try:
            off = self.rng.randrange(RO_SIZE - 4096)
            if os.pread(fd, 4096, off) != want[off : off + 4096]:
                raise Failure(f"{name}: content changed (read after copy-up)")
        finally:
            os.close(fd)


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


def _size(root: Path, name: str) -> int:
    try:
        return os.stat(root / name).st_size
    except FileNotFoundError:
        return 0


# -- processes ---------------------------------------------------------------------------


def worker_main(args: argparse.Namespace, index: int) -> int:
    work = Path(args.work_dir)
    rng = random.Random(f"{args.seed}/{index}")
    worker = Worker(
        Path(args.merged), Path(args.shadow), Locks(work / "locks", Path(args.shadow)), rng
    )
    progress = os.open(work / f"progress.{index}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for n in range(args.ops):
            worker.step()
            if n % PROGRESS_EVERY == 0:
                os.pwrite(progress, b"%12d\n" % n, 0)
        os.pwrite(progress, b"%12d\n" % args.ops, 0)
    except Failure as exc:
        (work / f"failure.{index}").write_text(str(exc))
        return 1
    except OSError as exc:
        (work / f"failure.{index}").write_text(f"unexpected {exc!r}")
        return 1
    (work / f"counts.{index}").write_text(json.dumps(worker.counts))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for opt in ("--merged", "--shadow", "--work-dir"):
        parser.add_argument(opt, required=True)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--ops", type=int, default=300)
    parser.add_argument("--seed", default="0")
    args = parser.parse_args(argv)
    (Path(args.work_dir) / "locks").mkdir(parents=True, exist_ok=True)
    pids = []
    for i in range(args.procs):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = worker_main(args, i)
            finally:
                os._exit(code)
        pids.append(pid)
    failed = 0
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        failed += os.waitstatus_to_exitcode(status) != 0
    return 1 if failed else 0


# -- the watchdog --------------------------------------------------------------------------


def _progress(work: Path) -> int:
    total = 0
    for p in work.glob("progress.*"):
        with contextlib.suppress(ValueError, OSError):
            total += int(p.read_text().strip() or 0)
    return total


def abort_fuse_connection(mountpoint: Path) -> None:
    """Abort the FUSE connection behind ``mountpoint`` (unblocks every waiting caller)."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target and "fuse" in line.split(" - ")[1].split()[0]:
                minor = fields[2].split(":")[1]
                with contextlib.suppress(OSError):
                    Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")


def run_with_watchdog(
    merged: Path,
    shadow: Path,
    work: Path,
    *,
    procs: int,
    ops: int,
    seed: str,
    stall: float = 60.0,
    daemon_pid: int | None = None,
) -> dict:
    """Run the exerciser; return a summary, with ``hang`` set if progress stalled."""
    cmd = [
        sys.executable,
        __file__,
        "--merged",
        str(merged),
        "--shadow",
        str(shadow),
        "--work-dir",
        str(work),
        "--procs",
        str(procs),
        "--ops",
        str(ops),
        "--seed",
        seed,
    ]
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
    last, last_change, hang = -1, time.monotonic(), ""
    start = time.monotonic()
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            now = _progress(work)
            if now != last:
                last, last_change = now, time.monotonic()
            elif time.monotonic() - last_change > stall:
                hang = f"no progress for {stall:.0f}s after {now} operations"
                hang += _stacks(daemon_pid)
                break
    finally:
        if proc.poll() is None:
            # Our own process group (start_new_session): the exerciser and its workers.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            abort_fuse_connection(merged)
        proc.wait()
    failures = [p.read_text() for p in sorted(work.glob("failure.*"))]
    counts: dict[str, int] = {}
    for p in work.glob("counts.*"):
        for k, v in json.loads(p.read_text()).items():
            counts[k] = counts.get(k, 0) + v
    return {
        "returncode": proc.returncode,
        "hang": hang,
        "failures": failures,
        "counts": counts,
        "operations": _progress(work),
        "seconds": time.monotonic() - start,
    }


def _stacks(pid: int | None) -> str:
    """The kernel stacks of the daemon's threads, for the hang report."""
    if pid is None:
        return ""
    out = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out.append(f"thread {tid}: " + Path(f"/proc/{pid}/task/{tid}/stack").read_text())
    return "\n" + "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
