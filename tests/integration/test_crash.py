"""Crash safety: SIGKILL of the daemon during copy-ups, renames and whiteouts loses nothing.

Each round mounts fresh upper and work dirs over the same lowers (big files, so copy-ups
take a while), runs a client that carries out a seeded list of operations and journals
each one (begun / ended) outside the mount, and SIGKILLs the daemon after a random delay.
After unmounting the dead mount and mounting again, the merged tree must equal the model
after the ended operations, or after those plus the one in flight; nothing but WORK/work
may hold temporary objects, and the new mount must have emptied WORK/work.

Run as a script (``python test_crash.py client ...``) this file is that client.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import os
import random
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from reliability_util import Daemon, Layout, record

BIG = 16 << 20
BIG_FILES = ("big0", "big1", "big2", "big3")
OPS_PER_ROUND = 36
LOWER_DIRS = frozenset({"", "d0", "d1", "d1/sub"})
#: Operations whose kill points we count: what the daemon was doing when it died.
KIND_LABEL = {
    "append": "copy-up + write",
    "truncate": "copy-up + truncate",
    "chmod": "copy-up + chmod",
    "rename": "rename (whiteout)",
    "unlink": "unlink (whiteout)",
    "rmdir": "rmdir (whiteout)",
    "mkdir": "mkdir",
    "write_new": "create + write",
    "link": "link",
}


# -- the model -----------------------------------------------------------------------------


@dataclasses.dataclass
class Model:
    """The merged tree as the operations leave it: paths -> inode, inode -> (data, mode)."""

    files: dict[str, int]
    inodes: dict[int, list]  # [data: bytes, mode: int]
    dirs: set[str]
    #: Directories some lower layer has (they cannot be renamed without redirect_dir).
    lower_dirs: set[str]

    def copy(self) -> Model:
        return Model(
            dict(self.files),
            {k: list(v) for k, v in self.inodes.items()},
            set(self.dirs),
            set(self.lower_dirs),
        )

    def view(self) -> dict[str, tuple]:
        out: dict[str, tuple] = {d: ("dir",) for d in self.dirs}
        for path, ino in self.files.items():
            data, mode = self.inodes[ino]
            out[path] = ("file", hashlib.sha256(data).hexdigest(), mode)
        return out

    def children(self, d: str) -> list[str]:
        prefix = d + "/" if d else ""
        names = [p for p in [*self.files, *self.dirs] if p.startswith(prefix) and p != d]
        return [p for p in names if "/" not in p[len(prefix) :]]


@functools.cache
def big_data(i: int) -> bytes:
    return random.Random(i).randbytes(BIG)


def initial_model() -> Model:
    """What the lowers built by :func:`build_lowers` show when merged."""
    files: dict[str, int] = {}
    inodes: dict[int, list] = {}

    def add(path: str, data: bytes, mode: int = 0o644) -> None:
        ino = len(inodes) + 1
        inodes[ino] = [data, mode]
        files[path] = ino

    for i, name in enumerate(BIG_FILES):
        add(name, big_data(i))
    for i in range(3):
        add(f"d0/f{i}", b"f%d\n" % i * 1000, 0o600 if i == 2 else 0o644)
    add("d0/g0", b"g0\n" * 500)
    add("d1/h0", b"h0\n" * 100)
    add("d1/h1", b"h1\n" * 100)
    add("d1/sub/s0", b"s0\n")
    return Model(files, inodes, set(LOWER_DIRS), set(LOWER_DIRS))


def build_lowers(lowers: list[Path]) -> None:
    """Two lowers: d0 is merged from both; the big files are split between them."""
    top, bottom = lowers
    model = initial_model()
    for path, ino in model.files.items():
        data, mode = model.inodes[ino]
        in_top = path in ("big0", "big1") or path.startswith("d0/f")
        dest = (top if in_top else bottom) / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        dest.chmod(mode)
    (top / "d0").mkdir(exist_ok=True)


def plan(seed: int, count: int = OPS_PER_ROUND) -> list[list]:
    """A seeded list of operations that are all valid on the model in order."""
    rng = random.Random(seed)
    model = initial_model()
    ops: list[list] = []
    serial = 0
    while len(ops) < count:
        serial += 1
        op = _pick(rng, model, serial)
        if op is None:
            continue
        apply(model, op)
        ops.append(op)
        if op[0] == "write_new":  # publish it with a rename, as careful writers do
            final = op[1].replace(".tmp", "")
            if final not in model.files and final not in model.dirs:
                ops.append(["rename", op[1], final])
                apply(model, ops[-1])
    return ops


def _pick(rng: random.Random, m: Model, serial: int) -> list | None:
    files = sorted(m.files)
    dirs = sorted(m.dirs)
    kind = rng.choice(
        ["append"] * 4
        + ["chmod", "truncate", "rename", "rename", "unlink", "unlink"]
        + ["mkdir", "rmdir", "write_new", "write_new", "link"]
    )
    if kind in ("append", "chmod", "truncate", "unlink", "link", "rename") and not files:
        return None
    # Half the copy-up-prone operations go to the big files, whose copy-up takes long
    # enough for the kill to land inside it.
    bigs = [f for f in files if f.startswith("big")]
    target = rng.choice(bigs if bigs and rng.random() < 0.5 else files) if files else ""
    if kind == "append":
        return ["append", target, (b"<append %d>" % serial).hex()]
    if kind == "chmod":
        return ["chmod", target, rng.choice([0o600, 0o640, 0o755, 0o444])]
    if kind == "truncate":
        path = target
        size = len(m.inodes[m.files[path]][0])
        return ["truncate", path, rng.randint(0, max(size - 1, 0))]
    if kind == "unlink":
        return ["unlink", rng.choice(files)]
    parent = rng.choice(dirs)
    new = (parent + "/" if parent else "") + f"n{serial}"
    if kind == "link":
        return ["link", rng.choice(files), new]
    if kind == "rename":
        if rng.random() < 0.3:
            movable = [d for d in dirs if d and d not in m.lower_dirs]
            if movable:
                src = rng.choice(movable)
                if not (new + "/").startswith(src + "/"):
                    return ["rename", src, new]
        dest = rng.choice([new, rng.choice(files)])
        src = rng.choice(files)
        return ["rename", src, dest] if src != dest else None
    if kind == "mkdir":
        gone = [d for d in sorted(LOWER_DIRS) if d and d not in m.dirs and d not in m.files]
        target = rng.choice(gone) if gone and rng.random() < 0.5 else new
        if target.rpartition("/")[0] not in m.dirs:
            return None
        return ["mkdir", target]
    if kind == "rmdir":
        empty = [d for d in dirs if d and not m.children(d)]
        if not empty:
            # empty a directory first, one unlink at a time, so rmdir gets its turn
            full = [d for d in dirs if d and all(c in m.files for c in m.children(d))]
            return ["unlink", m.children(rng.choice(full))[0]] if full else None
        return ["rmdir", rng.choice(empty)]
    size = rng.choice([100, 300_000, 3 << 20])
    return ["write_new", new + ".tmp", size, serial]


def new_data(size: int, serial: int) -> bytes:
    return random.Random(serial * 7919).randbytes(size)


def apply(m: Model, op: list) -> None:
    """Change the model as the operation changes the file system."""
    kind = op[0]
    if kind == "append":
        m.inodes[m.files[op[1]]][0] += bytes.fromhex(op[2])
    elif kind == "chmod":
        m.inodes[m.files[op[1]]][1] = op[2]
    elif kind == "truncate":
        entry = m.inodes[m.files[op[1]]]
        entry[0] = entry[0][: op[2]]
    elif kind == "unlink":
        del m.files[op[1]]
    elif kind == "link":
        m.files[op[2]] = m.files[op[1]]
    elif kind == "mkdir":
        m.dirs.add(op[1])
    elif kind == "rmdir":
        m.dirs.discard(op[1])
        m.lower_dirs.discard(op[1])
    elif kind == "write_new":
        ino = max(m.inodes) + 1
        m.inodes[ino] = [new_data(op[2], op[3]), 0o644]
        m.files[op[1]] = ino
    elif kind == "rename":
        _apply_rename(m, op[1], op[2])


def _apply_rename(m: Model, src: str, dst: str) -> None:
    if src in m.files:
        if m.files.get(dst) == m.files[src]:
            return  # two names of one inode: rename(2) leaves both
        m.files[dst] = m.files.pop(src)
        return
    moved = [p for p in [*m.files, *m.dirs] if p == src or p.startswith(src + "/")]
    for p in moved:
        q = dst + p[len(src) :]
        if p in m.files:
            m.files[q] = m.files.pop(p)
        else:
            m.dirs.discard(p)
            m.dirs.add(q)


# -- the client ----------------------------------------------------------------------------


def run_op(root: Path, op: list) -> None:
    kind, path = op[0], root / op[1]
    if kind == "append":
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, bytes.fromhex(op[2]))
        finally:
            os.close(fd)
    elif kind == "chmod":
        os.chmod(path, op[2])
    elif kind == "truncate":
        os.truncate(path, op[2])
    elif kind == "unlink":
        os.unlink(path)
    elif kind == "link":
        os.link(path, root / op[2])
    elif kind == "mkdir":
        os.mkdir(path, 0o755)
    elif kind == "rmdir":
        os.rmdir(path)
    elif kind == "rename":
        os.rename(path, root / op[2])
    elif kind == "write_new":
        data = new_data(op[2], op[3])
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for off in range(0, len(data), 256 << 10):
                os.write(fd, data[off : off + (256 << 10)])
        finally:
            os.close(fd)


def client_main(root: str, seed: int, journal: str) -> int:
    """Carry out the plan for ``seed`` on ``root``, journalling B/E lines; stop at an error."""
    os.umask(0)
    with open(journal, "a", buffering=1) as j:
        j.write("ready\n")
        for i, op in enumerate(plan(seed)):
            j.write(f"B {i}\n")
            try:
                run_op(Path(root), op)
            except OSError as exc:
                j.write(f"X {i} {exc.errno}\n")
                return 1
            j.write(f"E {i}\n")
    return 0


# -- checking ------------------------------------------------------------------------------


def read_journal(path: Path) -> tuple[int, int | None]:
    """(operations ended, index of the one in flight or None)."""
    ended, begun = 0, None
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts[0] == "B":
            begun = int(parts[1])
        elif parts[0] == "E":
            ended, begun = int(parts[1]) + 1, None
    return ended, begun


#: What an operation gets from a mount whose daemon was killed under it.
KILLED_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED})


def failed_before_kill(path: Path) -> str:
    """An operation that failed for another reason than the kill (a valid operation must
    not fail); empty if none did."""
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts[0] == "X" and int(parts[2]) not in KILLED_ERRNOS:
            return f"operation {parts[1]} failed with {errno.errorcode.get(int(parts[2]))}"
    return ""


def actual_view(merged: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {"": ("dir",)}
    for dirpath, dirnames, filenames in os.walk(merged):
        rel_dir = os.path.relpath(dirpath, merged)
        rel_dir = "" if rel_dir == "." else rel_dir
        for name in dirnames:
            out[os.path.join(rel_dir, name)] = ("dir",)
        for name in filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            with open(full, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.join(rel_dir, name)] = ("file", digest, stat.S_IMODE(st.st_mode))
    return out


def acceptable_views(ops: list[list], ended: int, in_flight: int | None) -> list[dict]:
    """The merged trees a correct overlay may show after the kill."""
    model = initial_model()
    for op in ops[:ended]:
        apply(model, op)
    views = [model.view()]
    if in_flight is not None:
        op = ops[in_flight]
        after = model.copy()
        apply(after, op)
        views.append(after.view())
        if op[0] == "write_new":
            # The client's own file may hold any prefix of what it was writing.
            data = new_data(op[2], op[3])
            got = views[0].copy()
            got[op[1]] = ("prefix", data)
            views.append(got)
    return views


def matches(actual: dict[str, tuple], view: dict[str, tuple]) -> bool:
    if set(actual) != set(view):
        return False
    for path, want in view.items():
        if want[0] == "prefix":
            continue  # compared by the caller
        if actual[path] != want:
            return False
    return True


def prefix_ok(merged: Path, view: dict[str, tuple]) -> bool:
    for path, want in view.items():
        if want[0] == "prefix":
            got = (merged / path).read_bytes()
            if not want[1].startswith(got):
                return False
    return True


def strays_outside_work(layout: Layout) -> list[str]:
    """Names in upper that look like our (or the kernel's) temporary objects."""
    found = []
    for dirpath, dirnames, filenames in os.walk(layout.upper):
        for name in dirnames + filenames:
            if name.startswith("#"):
                found.append(os.path.join(dirpath, name))
    return found


# -- the test ------------------------------------------------------------------------------


@dataclasses.dataclass
class Round:
    in_flight_kind: str | None
    ok: bool
    problem: str = ""


def crash_round(base: Path, lowers: list[Path], seed: int, delay: float) -> Round:
    root = base / f"round{seed}"
    for name in ("upper", "work", "merged"):
        (root / name).mkdir(parents=True)
    layout = Layout(root, lowers, root / "upper", root / "work", root / "merged")
    journal = root / "journal"
    ops = plan(seed)
    with Daemon(layout.args(), layout.merged) as daemon:
        client = subprocess.Popen(
            [sys.executable, __file__, "client", str(layout.merged), str(seed), str(journal)],
            stdin=subprocess.DEVNULL,
        )
        try:
            _wait_ready(journal)
            time.sleep(delay)
            daemon.kill()
            client.wait(timeout=60)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
    ended, in_flight = read_journal(journal)
    kind = ops[in_flight][0] if in_flight is not None else None
    refused = failed_before_kill(journal)
    if refused:
        return Round(kind, False, f"seed {seed}: {refused}")
    strays = strays_outside_work(layout)
    if strays:
        return Round(kind, False, f"temporary objects outside WORK/work: {strays}")
    with Daemon(layout.args(), layout.merged):
        leftovers = os.listdir(layout.work / "work")
        if leftovers:
            return Round(kind, False, f"WORK/work not emptied at mount: {leftovers}")
        actual = actual_view(layout.merged)
        for view in acceptable_views(ops, ended, in_flight):
            if matches(actual, view) and prefix_ok(layout.merged, view):
                return Round(kind, True)
    model = initial_model()
    for op in ops[:ended]:
        apply(model, op)
    want = model.view()
    diff = {p: (actual.get(p), want.get(p)) for p in set(actual) | set(want)}
    diff = {p: v for p, v in diff.items() if v[0] != v[1]}
    return Round(kind, False, f"seed {seed}, {ended} ended, in flight {in_flight}: {diff}")


def _wait_ready(journal: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if journal.exists() and journal.read_text().startswith("ready"):
            return
        time.sleep(0.01)
    raise AssertionError("crash client never started")


@pytest.fixture(scope="module")
def crash_lowers(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    base = tmp_path_factory.mktemp("crash-lowers")
    lowers = [base / "lower0", base / "lower1"]
    for p in lowers:
        p.mkdir()
    build_lowers(lowers)
    return lowers


def full_run_seconds(base: Path, lowers: list[Path]) -> float:
    """How long an uninterrupted round takes; its end state must equal the model."""
    root = base / "full"
    for name in ("upper", "work", "merged"):
        (root / name).mkdir(parents=True)
    layout = Layout(root, lowers, root / "upper", root / "work", root / "merged")
    journal = root / "journal"
    with Daemon(layout.args(), layout.merged):
        start = time.monotonic()
        rc = client_main(str(layout.merged), 0, str(journal))
        took = time.monotonic() - start
        assert rc == 0, journal.read_text()
        model = initial_model()
        for op in plan(0):
            apply(model, op)
        assert actual_view(layout.merged) == model.view()
    return took


def run_rounds(base: Path, lowers: list[Path], rounds: int, first_seed: int) -> None:
    took = full_run_seconds(base, lowers)
    rng = random.Random(first_seed)
    kinds: Counter[str] = Counter()
    failures = []
    for seed in range(first_seed, first_seed + rounds):
        result = crash_round(base, lowers, seed, rng.uniform(0.0, took))
        kinds[KIND_LABEL.get(result.in_flight_kind or "", "between operations")] += 1
        if not result.ok:
            failures.append(result.problem)
    for label, count in sorted(kinds.items()):
        record("crash", f"SIGKILL during {label}", count, 0, "")
    record("crash", "SIGKILL rounds (total)", rounds, len(failures), json.dumps(failures)[:300])
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(240)
def test_kill9_during_writes_loses_nothing(tmp_path: Path, crash_lowers: list[Path]) -> None:
    run_rounds(tmp_path, crash_lowers, rounds=8, first_seed=1)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_kill9_soak(tmp_path: Path, crash_lowers: list[Path]) -> None:
    rounds = int(os.environ.get("PYOVERLAY_CRASH_ROUNDS", "150"))
    run_rounds(tmp_path, crash_lowers, rounds=rounds, first_seed=1000)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "client":
    sys.exit(client_main(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
