"""Resource bounds and faults: fds, memory, a full upper, a failing lower.

- Walking 100,000 lower files keeps the daemon's open fds under a fixed limit; files
  opened and released, and inodes the kernel forgets (drop_caches), give their fds back;
  the daemon's RSS comes back down after the forgets (numbers go to the record).
- ENOSPC on upper (upper and work on a small tmpfs, blocks or inodes exhausted) comes
  back as ENOSPC from copy-up, write, create and whiteout creation; nothing half-made
  shows in the merged view or in upper, WORK/work is left empty, and everything written
  before is intact after a remount.
- EIO from a layer: the lower sits on ext4 on a loop device (direct I/O) whose backing
  file is cut short under one file's data blocks, so the block layer fails those reads
  for real. Reading or copying up that file gives EIO; the daemon keeps serving.

EDQUOT is not tested: quota limits do not bind a process with CAP_SYS_RESOURCE, and the
daemon runs as root (as kernel overlayfs copies up with the mounter's root credentials),
and this kernel's tmpfs has no quota support (see docs/reliability.md).
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mounts import tmpfs
from reliability_util import (
    Daemon,
    block_mount,
    drop_caches,
    fd_count,
    loop_device,
    make_layout,
    record,
    rss_kib,
)

#: The daemon caches at most 512 directory fds; everything else is per open file.
FD_LIMIT = 600


def populate_many(lower: Path, count: int) -> None:
    per_dir = 1000
    for d in range(count // per_dir):
        sub = lower / f"d{d:03}"
        sub.mkdir()
        for f in range(per_dir):
            fd = os.open(sub / f"f{f}", os.O_WRONLY | os.O_CREAT, 0o644)
            os.close(fd)


@pytest.fixture(scope="module")
def many_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lower = tmp_path_factory.mktemp("many") / "lower"
    lower.mkdir()
    populate_many(lower, int(os.environ.get("PYOVERLAY_WALK_FILES", "100000")))
    return lower


def _wait_settled(pid: int, baseline: int, timeout: float = 10.0) -> int:
    """fd count once FORGETs have been handled (they arrive asynchronously)."""
    deadline = time.monotonic() + timeout
    count = fd_count(pid)
    while count > baseline + 4 and time.monotonic() < deadline:
        time.sleep(0.2)
        count = fd_count(pid)
    return count


def walk_and_measure(lower: Path, root: Path, cycles: int) -> dict[str, int]:
    layout = make_layout(root, lowers=0)
    args = [str(lower), str(layout.upper), str(layout.work), str(layout.merged)]
    numbers: dict[str, int] = {"files": 0, "max_fds": 0}
    with Daemon(args, layout.merged) as daemon:
        pid = daemon.pid
        numbers["base_fds"], numbers["base_rss_kib"] = fd_count(pid), rss_kib(pid)
        numbers["peak_rss_kib"] = 0
        for _ in range(cycles):
            for dirpath, _, filenames in os.walk(layout.merged):
                for name in filenames:
                    os.lstat(os.path.join(dirpath, name))
                numbers["files"] += len(filenames)
                numbers["max_fds"] = max(numbers["max_fds"], fd_count(pid))
            numbers["peak_rss_kib"] = max(numbers["peak_rss_kib"], rss_kib(pid))
            # hold many files open at once, then release them all
            opened = [os.open(p, os.O_RDONLY) for p in list(layout.merged.glob("d00*/f*"))[:2000]]
            numbers["fds_while_2000_open"] = fd_count(pid)
            for fd in opened:
                os.close(fd)
            numbers["fds_after_release"] = _wait_settled(pid, numbers["base_fds"] + 512)
            drop_caches()
            numbers["fds_after_forget"] = _wait_settled(pid, numbers["base_fds"])
            time.sleep(1.0)
            numbers["rss_after_forget_kib"] = rss_kib(pid)
        assert daemon.alive()
    return numbers


def check_bounds(n: dict[str, int]) -> list[str]:
    problems = []
    if n["max_fds"] > FD_LIMIT:
        problems.append(f"{n['max_fds']} fds open during the walk (limit {FD_LIMIT})")
    if n["fds_while_2000_open"] < n["base_fds"] + 2000:
        problems.append("2000 open files did not show as daemon fds (measurement broken)")
    if n["fds_after_release"] > n["base_fds"] + 512 + 16:
        problems.append(f"{n['fds_after_release']} fds after releasing every file")
    if n["fds_after_forget"] > n["base_fds"] + 16:
        problems.append(f"{n['fds_after_forget']} fds after the kernel forgot every inode")
    grown = n["peak_rss_kib"] - n["base_rss_kib"]
    kept = n["rss_after_forget_kib"] - n["base_rss_kib"]
    # generous: at least half of what the walk took must come back (measured: ~3/4)
    if grown > 0 and kept > 0.5 * grown:
        problems.append(f"RSS kept {kept} KiB of {grown} KiB after forgets")
    if n["peak_rss_kib"] > 1_000_000:
        problems.append(f"RSS peaked at {n['peak_rss_kib']} KiB")
    return problems


def _run_walk(lower: Path, root: Path, cycles: int) -> None:
    numbers = walk_and_measure(lower, root, cycles)
    problems = check_bounds(numbers)
    record(
        "resources",
        f"walk {numbers['files']} files: fds bounded, released, forgotten",
        numbers["files"],
        len(problems),
        ", ".join(
            f"{k}={v}" for k, v in sorted(numbers.items(), key=lambda kv: "rss" not in kv[0])
        ),
    )
    assert not problems, (problems, numbers)


@pytest.mark.timeout(240)
def test_fds_and_memory_while_walking(many_files: Path, tmp_path: Path) -> None:
    _run_walk(many_files, tmp_path, cycles=1)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_fds_and_memory_soak(many_files: Path, tmp_path: Path) -> None:
    _run_walk(many_files, tmp_path, cycles=int(os.environ.get("PYOVERLAY_WALK_CYCLES", "5")))


# -- ENOSPC --------------------------------------------------------------------------------


def _errno_of(fn) -> int | None:  # type: ignore[no-untyped-def]
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return None


def _fill(path: Path) -> tuple[int, int | None]:
    """Write 256 KiB chunks until an error; (bytes the writes reported, errno)."""
    written = 0
    chunk = b"\xab" * (256 << 10)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                n = os.write(fd, chunk)
            except OSError as exc:
                return written, exc.errno
            written += n
            if written > 256 << 20:
                return written, None
    finally:
        os.close(fd)


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def enospc_checks(tmp: Path) -> list[str]:
    """Every ENOSPC scenario on one small tmpfs; returns the problems found."""
    lower, small = tmp / "lower", tmp / "small"
    lower.mkdir()
    small.mkdir()
    (lower / "big").write_bytes(os.urandom(12 << 20))
    for i in range(20):
        (lower / f"small{i}").write_bytes(b"s%d" % i * 3000)
    problems: list[str] = []
    with tmpfs(small, size="8m"):
        upper, work, merged = small / "upper", small / "work", tmp / "merged"
        for d in (upper, work, merged):
            d.mkdir()
        args = [str(lower), str(upper), str(work), str(merged)]
        want_big = _sha(lower / "big")
        with Daemon(args, merged) as daemon:
            (merged / "keep").write_bytes(b"keep me\n" * 1000)
            # copy-up of a file bigger than the whole upper
            code = _errno_of(lambda: os.close(os.open(merged / "big", os.O_WRONLY)))
            if code != errno.ENOSPC:
                problems.append(f"copy-up of a too-big file gave {code}")
            if (upper / "big").exists() or os.listdir(work / "work"):
                problems.append("a failed copy-up left objects in upper or WORK/work")
            if _sha(merged / "big") != want_big:
                problems.append("big changed after the failed copy-up")
            # fill the rest with a new file
            written, code = _fill(merged / "fill")
            if code != errno.ENOSPC:
                problems.append(f"filling upper ended with {code}")
            if (merged / "fill").stat().st_size != written:
                problems.append("the filled file's size is not what the writes reported")
            # with upper full: copy-ups of small files fail cleanly
            for i in range(3):
                code = _errno_of(lambda i=i: _append(merged / f"small{i}", b"x" * 9000))
                if code not in (errno.ENOSPC, None):
                    problems.append(f"append to small{i} on a full upper gave {code}")
                data = (merged / f"small{i}").read_bytes()
                if not (data == b"s%d" % i * 3000 or data == b"s%d" % i * 3000 + b"x" * 9000):
                    problems.append(f"small{i} is neither old nor new after ENOSPC")
            code = _errno_of(lambda: os.rename(merged / "small5", merged / "renamed5"))
            if code is not None and code != errno.ENOSPC:
                problems.append(f"rename on a full upper gave {code}")
            os.unlink(merged / "fill")
            if _sha(merged / "big") != want_big or not daemon.alive():
                problems.append("state after ENOSPC is wrong or the daemon died")
        with Daemon(args, merged):
            if (merged / "keep").read_bytes() != b"keep me\n" * 1000:
                problems.append("keep was damaged")
            if _sha(merged / "big") != want_big:
                problems.append("big differs after remount")
            names = set(os.listdir(merged))
            expected = {"big", "keep", *(f"small{i}" for i in range(20))}
            if "renamed5" in names:
                expected = (expected - {"small5"}) | {"renamed5"}
            if names != expected:
                problems.append(f"merged names after remount: {sorted(names ^ expected)}")
            if os.listdir(work / "work"):
                problems.append("WORK/work not empty after remount")
    problems += enospc_inodes(tmp)
    return problems


def enospc_inodes(tmp: Path) -> list[str]:
    """Upper out of inodes: whiteouts and creates fail with ENOSPC, lower names stay."""
    lower, small = tmp / "lower2", tmp / "small2"
    lower.mkdir()
    small.mkdir()
    for i in range(10):
        (lower / f"l{i}").write_text(f"l{i}\n")
    problems: list[str] = []
    with tmpfs(small, size="8m,nr_inodes=24"):
        upper, work, merged = small / "upper", small / "work", tmp / "merged2"
        for d in (upper, work, merged):
            d.mkdir()
        args = [str(lower), str(upper), str(work), str(merged)]
        with Daemon(args, merged) as daemon:
            made, code = 0, None
            while code is None and made < 100:
                code = _errno_of(lambda n=made: (merged / f"new{n}").write_text("n"))
                made += code is None
            if code != errno.ENOSPC:
                problems.append(f"creating files until out of inodes gave {code}")
            code = _errno_of(lambda: os.unlink(merged / "l0"))
            if code != errno.ENOSPC:
                problems.append(f"whiteout with no inodes left gave {code}")
            if (merged / "l0").read_text() != "l0\n":
                problems.append("l0 vanished or changed after the failed unlink")
            code = _errno_of(lambda: os.mkdir(merged / "dir"))
            if code != errno.ENOSPC or (merged / "dir").exists():
                problems.append(f"mkdir with no inodes left gave {code}")
            if os.listdir(work / "work"):
                problems.append("WORK/work holds leftovers after failed creations")
            os.unlink(merged / "new0")
            os.unlink(merged / "l0")  # now there is an inode for the whiteout
            if (merged / "l0").exists() or not daemon.alive():
                problems.append("unlink after freeing an inode did not work")
            created = {f"new{i}" for i in range(1, made)}
            if set(os.listdir(merged)) != created | {f"l{i}" for i in range(1, 10)}:
                problems.append(f"merged names wrong: {sorted(os.listdir(merged))}")
    return problems


@pytest.mark.timeout(120)
def test_enospc_on_upper(tmp_path: Path) -> None:
    problems = enospc_checks(tmp_path)
    record(
        "resources", "ENOSPC on upper (blocks and inodes)", 1, len(problems), "; ".join(problems)
    )
    assert not problems, problems


# -- EIO -----------------------------------------------------------------------------------


def _physical_blocks(path: Path) -> list[tuple[int, int]]:
    """(first, last) physical block of each extent of ``path``, from filefrag."""
    out = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True).stdout
    extents = []
    for line in out.splitlines():
        parts = line.replace(":", " ").replace("..", " ").split()
        if len(parts) >= 5 and parts[0].isdigit():
            extents.append((int(parts[3]), int(parts[4])))
    return extents


def eio_image(tmp: Path) -> tuple[Path, int]:
    """An ext4 image whose file lower/bad lies past the returned byte offset."""
    image, mnt = tmp / "ext4.img", tmp / "img"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "1024", str(image)], check=True)
    with loop_device(image) as dev, block_mount(dev, mnt):
        (mnt / "lower").mkdir()
        (mnt / "lower" / "good").write_text("good\n")
        (mnt / "lower" / "bad").write_bytes(os.urandom(4 << 20))
        os.sync()
        extents = _physical_blocks(mnt / "lower" / "bad")
    assert extents, "filefrag found no extents"
    first = min(e[0] for e in extents)
    return image, first * 1024


@pytest.mark.timeout(120)
def test_eio_from_a_lower_layer(tmp_path: Path) -> None:
    image, cut = eio_image(tmp_path)
    mnt = tmp_path / "img"
    problems: list[str] = []
    with loop_device(image, direct_io=True) as dev, block_mount(dev, mnt, "ro,noload"):
        # the data of lower/bad is now past the end of the backing file: reads fail
        os.truncate(image, cut)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        layout = make_layout(tmp_path / "ov", lowers=0)
        args = [str(mnt / "lower"), str(layout.upper), str(layout.work), str(layout.merged)]
        with Daemon(args, layout.merged) as daemon:
            m = layout.merged
            if (m / "good").read_text() != "good\n":
                problems.append("good unreadable")
            code = _errno_of(lambda: (m / "bad").read_bytes())
            if code != errno.EIO:
                problems.append(f"reading bad gave {code}, not EIO")
            code = _errno_of(lambda: os.close(os.open(m / "bad", os.O_WRONLY)))
            if code != errno.EIO:
                problems.append(f"copy-up of bad gave {code}, not EIO")
            if (layout.upper / "bad").exists() or os.listdir(layout.work / "work"):
                problems.append("the failed copy-up left something in upper or WORK/work")
            (m / "after").write_text("still serving\n")
            if (m / "after").read_text() != "still serving\n" or not daemon.alive():
                problems.append("the daemon stopped serving after EIO")
            if (m / "bad").stat().st_size != 4 << 20:
                problems.append("stat of bad changed")
    record(
        "resources",
        "EIO from a lower layer (loop device cut short)",
        1,
        len(problems),
        "; ".join(problems),
    )
    assert not problems, problems
