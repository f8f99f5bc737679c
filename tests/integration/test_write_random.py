"""Random operation sequences on kernel overlayfs and pyoverlay, compared step by step.

A hypothesis ``RuleBasedStateMachine`` draws operations of every write kind (and a few
reads) over the names of the write layer set (three lowers plus upper) and new names.
Each step runs on both mounts; after every step the results, the merged trees and the
upper directories must agree. The default run has a fixed, derandomized budget; set
PYOVERLAY_SOAK=1 or run ``-m soak`` for long random runs.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

sys.path.insert(0, str(Path(__file__).parent))

from oplog import RENAME_EXCHANGE, RENAME_NOREPLACE, Op, Pair, build_write_set, op

FILES = [
    "d/f0", "d/f1", "d/f2", "d/l1file", "hl_a", "hl_b", "big", "top", "exec", "xat", "ro",
    "suid", "u_file", "m/from0", "m/from1", "m/from2", "m/from_u", "ldir/x", "ldir/y/z",
    "l1only/inner", "wh_target", "sym", "dangling", "fifo", "chr", "sock", "blk",
    "opq/shown", "opq/hidden", "uo/u", "d/sub/deep/leaf", "u_dir/u_inner", "gone/inner",
]  # fmt: skip
DIRS = [
    "d", "d/sub", "d/sub/deep", "m", "ldir", "ldir/y", "l1only", "opq", "uo", "gone",
    "emptydir", "u_dir", "u_empty", "sgid",
]  # fmt: skip
NEW = ["n1", "n2", "d/n3", "m/n4", "ldir/y/n5", "gone/n6", "emptydir/n7", "u_dir/n8", "sgid/n9"]
PATHS = st.sampled_from(FILES + DIRS + NEW)
OPENS = ["open_trunc", "open_w", "open_rw", "open_r", "open_r_trunc", "open_creat", "ftruncate"]
PARENTS = st.sampled_from(["", *DIRS])
MODES = st.sampled_from([0o644, 0o600, 0o755, 0o2755, 0o4711, 0o777, 0o000])
XATTRS = st.sampled_from(["user.a", "user.k", "trusted.t", "trusted.overlay.mine"])
TIMES = st.one_of(st.sampled_from(["now", "omit"]), st.integers(0, 2_000_000_000 * 10**9))
DATA = st.binary(min_size=0, max_size=300)
NODES = st.sampled_from([("fifo", 0, 0), ("sock", 0, 0), ("chr", 1, 5), ("blk", 7, 254)])

SOAK = os.environ.get("PYOVERLAY_SOAK") == "1"


class WriteMachine(RuleBasedStateMachine):
    """Both mounts over fresh copies of the write set; every rule is one operation."""

    src: Path
    workspace: Path
    redirect = False

    def __init__(self) -> None:
        super().__init__()
        self.base = Path(tempfile.mkdtemp(dir=self.workspace))
        self.pair = Pair(self.src, self.base, redirect=self.redirect)
        self.pair.__enter__()

    def teardown(self) -> None:
        try:
            if self.pair.mounted:
                found = self.pair.finish()
                assert found == [], self._report(found)
        finally:
            self.pair.unmount()
            shutil.rmtree(self.base, ignore_errors=True)

    def _report(self, found: list[str]) -> str:
        steps = "\n".join(self.pair.log)
        return "divergences:\n" + "\n".join(found) + "\nafter:\n" + steps

    def do(self, o: Op) -> None:
        self.pair.step(o)

    @invariant()
    def same_results_and_trees(self) -> None:
        found = list(self.pair.divergences)
        if not found:
            found = self.pair.merged_diff() + self.pair.upper_diff()
        assert found == [], self._report(found)

    # -- namespace -------------------------------------------------------------------

    @rule(path=PATHS, mode=MODES)
    def create(self, path: str, mode: int) -> None:
        self.do(op("create", path, mode))

    @rule(parent=PARENTS, name=st.sampled_from(["nd", "n1", "f2", "gone"]), mode=MODES)
    def mkdir(self, parent: str, name: str, mode: int) -> None:
        self.do(op("mkdir", f"{parent}/{name}".lstrip("/"), mode))

    @rule(path=PATHS, node=NODES)
    def mknod(self, path: str, node: tuple[str, int, int]) -> None:
        self.do(op("mknod", path, node[0], 0o640, node[1], node[2]))

    @rule(dest=st.sampled_from(["d/f0", "../x", "nowhere"]), path=PATHS)
    def symlink(self, dest: str, path: str) -> None:
        self.do(op("symlink", dest, path))

    @rule(src=PATHS, dst=PATHS)
    def link(self, src: str, dst: str) -> None:
        self.do(op("link", src, dst))

    @rule(path=PATHS)
    def unlink(self, path: str) -> None:
        self.do(op("unlink", path))

    @rule(path=st.sampled_from(DIRS + NEW))
    def rmdir(self, path: str) -> None:
        self.do(op("rmdir", path))

    @rule(src=PATHS, dst=PATHS, flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, src: str, dst: str, flags: int) -> None:
        self.do(op("rename", src, dst, flags))

    @rule(src=st.sampled_from(DIRS), dst=st.sampled_from(DIRS + NEW + ["d/sub/x", "m/x"]))
    def rename_dir(self, src: str, dst: str) -> None:
        self.do(op("rename", src, dst))

    # -- data and attributes ---------------------------------------------------------

    @rule(path=PATHS, offset=st.integers(0, 70_000), data=DATA)
    def write(self, path: str, offset: int, data: bytes) -> None:
        self.do(op("write", path, offset, data))

    @rule(path=PATHS, data=DATA)
    def append(self, path: str, data: bytes) -> None:
        self.do(op("append", path, data))

    @rule(path=PATHS, how=st.sampled_from(OPENS))
    def open(self, path: str, how: str) -> None:
        self.do(op(how, path, 7) if how == "ftruncate" else op(how, path))

    @rule(path=PATHS, size=st.integers(0, 100_000))
    def truncate(self, path: str, size: int) -> None:
        self.do(op("truncate", path, size))

    @rule(path=PATHS, mode=MODES)
    def chmod(self, path: str, mode: int) -> None:
        self.do(op("chmod", path, mode))

    @rule(path=PATHS, uid=st.sampled_from([-1, 0, 1000]), gid=st.sampled_from([-1, 0, 100]))
    def chown(self, path: str, uid: int, gid: int) -> None:
        self.do(op("chown", path, uid, gid))

    @rule(path=PATHS, atime=TIMES, mtime=TIMES)
    def utimens(self, path: str, atime: int | str, mtime: int | str) -> None:
        self.do(op("utimens", path, atime, mtime))

    @rule(path=PATHS, name=XATTRS, value=st.binary(max_size=20))
    def setxattr(self, path: str, name: str, value: bytes) -> None:
        self.do(op("setxattr", path, name, value))

    @rule(path=PATHS, name=XATTRS)
    def removexattr(self, path: str, name: str) -> None:
        self.do(op("removexattr", path, name))

    @rule(path=PATHS, write=st.booleans())
    def fsync(self, path: str, write: bool) -> None:
        self.do(op("fsync", path, write))

    @rule(name=st.sampled_from(["n9", "sub9"]), mkdir=st.booleans())
    def as_user_in_setgid_dir(self, name: str, mkdir: bool) -> None:
        inner = op("mkdir", f"sgid/{name}", 0o777) if mkdir else op("create", f"sgid/{name}")
        self.do(op("as_user", 1000, 1000, 0o022, inner))

    # -- observations ------------------------------------------------------------------

    @rule(path=PATHS)
    def observe(self, path: str) -> None:
        for name in ("stat", "read", "listxattr"):
            self.do(op(name, path))

    @rule(path=PARENTS)
    def listdir(self, path: str) -> None:
        self.do(op("listdir", path))


class RedirectMachine(WriteMachine):
    """The same rules with ``redirect_dir=on`` on both sides: lower directories move."""

    redirect = True


def machine_settings(soak: bool, examples: int = 12) -> settings:
    if soak:
        return settings(
            max_examples=int(os.environ.get("PYOVERLAY_SOAK_EXAMPLES", "300")),
            stateful_step_count=60,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
    # A fixed budget: the same sequences every run, no shrinking (the failure report
    # lists every step already), well under a minute on two cores.
    return settings(
        max_examples=examples,
        stateful_step_count=25,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
        phases=(Phase.explicit, Phase.generate),
    )


MACHINES = {"redirect_off": (WriteMachine, 12), "redirect_on": (RedirectMachine, 6)}


@pytest.fixture(scope="module", params=sorted(MACHINES))
def machine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[type[WriteMachine], int]:
    cls, examples = MACHINES[request.param]
    root = tmp_path_factory.mktemp("random")
    cls.src = build_write_set(root / "src")
    cls.workspace = root
    return cls, examples


@pytest.mark.timeout(6 * 3600 if SOAK else 240)
def test_random_sequences(machine: tuple[type[WriteMachine], int]) -> None:
    """The fixed budget; with PYOVERLAY_SOAK=1 the long random mode."""
    cls, examples = machine
    cls.TestCase.settings = machine_settings(SOAK, examples)
    cls.TestCase().runTest()


@pytest.mark.soak
@pytest.mark.timeout(6 * 3600)
def test_random_sequences_soak(machine: tuple[type[WriteMachine], int]) -> None:
    cls, _ = machine
    cls.TestCase.settings = machine_settings(True)
    cls.TestCase().runTest()
