"""Bad input on every CLI command: one line on stderr, non-zero exit, nothing mounted.

hypothesis builds argument lists for ``mount`` (positional forms, ``-o`` option strings
mixing real option names with junk values, real and missing and wrong-type paths),
``umount`` and each ``containerd`` subcommand (missing, empty and garbage roots). Each
list runs as the real command (``python -m pyoverlay ...``) in a subprocess, several at
once. An input that fails must print exactly one line, exit non-zero, show no traceback
and leave no mount; an input that happens to be valid may succeed (its mount is
unmounted at once), but must not print a traceback either.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

from mounts import daemon_env, umount_exact
from reliability_util import record

PARALLEL = 3
#: How many argument lists each example runs (in parallel); examples are set per test.
BATCH = 6
EXAMPLES = int(os.environ.get("PYOVERLAY_FUZZ_EXAMPLES", "6"))
COUNTS = {"tried": 0, "bad": 0}


class Paths:
    """The directories fuzzed arguments point into (made once per module)."""

    def __init__(self, root: Path):
        self.root = root
        self.lower, self.lower2, self.upper, self.work, self.merged = (
            root / n for n in ("lower", "lower2", "upper", "work", "merged")
        )
        for d in (self.lower, self.lower2, self.upper, self.work, self.merged):
            d.mkdir(parents=True, exist_ok=True)
        (self.lower / "f").write_text("f\n")
        self.file = root / "plain-file"
        self.file.write_text("not a directory\n")
        self.missing = root / "missing"
        self.garbage_root = root / "garbage-root"
        bolt = self.garbage_root / "io.containerd.metadata.v1.bolt"
        bolt.mkdir(parents=True, exist_ok=True)
        (bolt / "meta.db").write_bytes(os.urandom(3 * 4096))
        self.short_root = root / "short-root"
        (self.short_root / "io.containerd.metadata.v1.bolt").mkdir(parents=True, exist_ok=True)
        (self.short_root / "io.containerd.metadata.v1.bolt" / "meta.db").write_bytes(b"\0" * 100)
        self.empty_root = root / "empty-root"
        self.empty_root.mkdir(exist_ok=True)

    def all(self) -> list[str]:
        return [
            str(p)
            for p in (
                self.lower,
                self.lower2,
                self.upper,
                self.work,
                self.merged,
                self.file,
                self.missing,
                self.garbage_root,
                self.short_root,
                self.empty_root,
                self.root,
            )
        ]


# -- strategies ----------------------------------------------------------------------------

_CHARS = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
junk = st.text(_CHARS, max_size=40)
OPTION_NAMES = [
    "lowerdir",
    "upperdir",
    "workdir",
    "redirect_dir",
    "index",
    "xino",
    "metacopy",
    "userxattr",
    "volatile",
    "ro",
    "rw",
    "fsname",
    "uuid",
    "nfs_export",
    "default_permissions",
    "allow_other",
    "cache",
    "timeout",
    "uidmapping",
    "x-systemd.after",
    "context",
    "",
]


def option_strings(paths: Paths) -> st.SearchStrategy[str]:
    value = st.one_of(junk, st.sampled_from([*paths.all(), "on", "off", "-1", "1e99", ":"]))
    item = st.one_of(
        st.builds(lambda k, v: f"{k}={v}", st.sampled_from(OPTION_NAMES), value),
        st.sampled_from(OPTION_NAMES),
        junk,
    )
    return st.lists(item, max_size=6).map(",".join)


def path_args(paths: Paths) -> st.SearchStrategy[str]:
    joined = st.lists(st.sampled_from(paths.all()), min_size=1, max_size=3).map(":".join)
    return st.one_of(st.sampled_from(paths.all()), joined, junk, st.just("x" * 5000))


def mount_argv(paths: Paths) -> st.SearchStrategy[list[str]]:
    flag = st.sampled_from(["-r", "--read-only", "--debug", "--userxattr", "--bogus", "-z", "--"])
    token = st.one_of(path_args(paths), flag, st.just("-o"), option_strings(paths))
    with_options = st.builds(
        lambda o, rest: ["-o", o, *rest],
        option_strings(paths),
        st.lists(path_args(paths), max_size=2),
    )
    return st.one_of(st.lists(token, max_size=7), with_options).map(lambda a: ["mount", *a])


def umount_argv(paths: Paths) -> st.SearchStrategy[list[str]]:
    target = st.one_of(st.sampled_from([*paths.all(), "/", "/proc", "/sys", "", "--", "-x"]), junk)
    return st.lists(target, max_size=3).map(lambda a: ["umount", *a])


def containerd_argv(paths: Paths) -> st.SearchStrategy[list[str]]:
    roots = [str(paths.garbage_root), str(paths.short_root), str(paths.missing), str(paths.file)]
    sub = st.sampled_from(["images", "snapshots", "mount", "verify", "check", "nope", ""])
    opt = st.one_of(
        st.builds(lambda r: ["--root", r], st.one_of(st.sampled_from(roots), junk)),
        st.builds(lambda n: ["-n", n], junk),
        st.sampled_from([["-A"], ["--json"], ["--no-size"], ["--all"], ["-f"], ["--no-blobs"]]),
        st.sampled_from([["--print-lowerdir"], ["--no-progress"], ["--root"], ["-n"]]),
        st.lists(st.one_of(junk, st.sampled_from(paths.all())), max_size=2),
    )
    # Every list names a bad root first, so no input can reach the host's real containerd.
    return st.builds(
        lambda s, r, opts: ["containerd", s, "--root", r, *[x for o in opts for x in o]],
        sub,
        st.sampled_from(roots),
        st.lists(opt, max_size=4),
    )


# -- running -------------------------------------------------------------------------------


def mounts_under(root: Path) -> list[str]:
    prefix = os.path.realpath(root) + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            if point.startswith(prefix) or point == prefix[:-1]:
                found.append(point)
    return found


def run_cli(argv: list[str], cwd: Path) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pyoverlay", *argv],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        cwd=cwd,
        env=daemon_env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return proc.returncode, proc.stderr


def judge(argv: list[str], code: int, err: str, new_mounts: list[str]) -> str | None:
    """What is wrong with this outcome (None if nothing)."""
    if "Traceback" in err:
        return f"{argv!r}: traceback\n{err}"
    if code == 0:
        return None  # a valid input; what it mounted is taken down by the caller
    lines = err.strip("\n").splitlines()
    if len(lines) != 1 or not lines[0].strip():
        return f"{argv!r}: exit {code} with {len(lines)} stderr lines: {err!r}"
    if new_mounts:
        return f"{argv!r}: exit {code} but left mounts {new_mounts}"
    return None


def run_batch(paths: Paths, batch: list[list[str]]) -> list[str]:
    problems = []
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        before = set(mounts_under(paths.root))
        outcomes = list(pool.map(lambda a: run_cli(a, paths.root), batch))
    after = [m for m in mounts_under(paths.root) if m not in before]
    for m in after:
        umount_exact(m, fuse=True)  # only a valid input may mount; take it down at once
    for argv, (code, err) in zip(batch, outcomes, strict=True):
        # a mount left while every input in the batch failed is blamed on each of them
        leaked = after if all(c != 0 for c, _ in outcomes) else []
        problem = judge(argv, code, err, leaked)
        COUNTS["tried"] += 1
        COUNTS["bad"] += code != 0
        if problem:
            problems.append(problem)
    return problems


@pytest.fixture(scope="module")
def fuzz_paths(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Paths]:
    paths = Paths(tmp_path_factory.mktemp("fuzz"))
    yield paths
    for m in mounts_under(paths.root):
        umount_exact(m, fuse=True)


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _fuzz(paths: Paths, strategy_of, what: str):  # type: ignore[no-untyped-def]
    failures: list[str] = []

    @FUZZ_SETTINGS
    @given(st.data())
    def check(data: st.DataObject) -> None:
        batch = data.draw(st.lists(strategy_of(paths), min_size=BATCH, max_size=BATCH))
        problems = run_batch(paths, batch)
        failures.extend(problems)
        assert not problems, problems[0]

    start = dict(COUNTS)
    with contextlib.ExitStack():
        try:
            check()
        finally:
            tried = COUNTS["tried"] - start["tried"]
            record(
                "cli", f"fuzzed {what} arguments", tried, len(failures), "; ".join(failures)[:300]
            )
    assert not mounts_under(paths.root)


@pytest.mark.timeout(300)
def test_fuzz_mount(fuzz_paths: Paths) -> None:
    _fuzz(fuzz_paths, mount_argv, "mount")


@pytest.mark.timeout(300)
def test_fuzz_umount(fuzz_paths: Paths) -> None:
    _fuzz(fuzz_paths, umount_argv, "umount")


@pytest.mark.timeout(300)
def test_fuzz_containerd(fuzz_paths: Paths) -> None:
    _fuzz(fuzz_paths, containerd_argv, "containerd")


@pytest.mark.timeout(120)
def test_every_command_rejects_junk_in_one_line(fuzz_paths: Paths) -> None:
    """A fixed list of bad inputs for every command, so each is covered every run."""
    junk_inputs = [
        ["mount"],
        ["mount", "-o", "lowerdir="],
        ["mount", "-o", "lowerdir=" + str(fuzz_paths.missing), str(fuzz_paths.merged)],
        ["mount", "-o", f"lowerdir={fuzz_paths.lower},bogus=1", str(fuzz_paths.merged)],
        ["mount", str(fuzz_paths.file), str(fuzz_paths.upper), str(fuzz_paths.work), "m"],
        ["mount", "--pid-file"],
        ["umount"],
        ["umount", str(fuzz_paths.merged)],
        ["umount", "/"],
        ["umount", "a", "b"],
        ["containerd"],
        ["containerd", "bogus"],
        ["containerd", "images", "--root", str(fuzz_paths.garbage_root)],
        ["containerd", "snapshots", "--root", str(fuzz_paths.short_root)],
        ["containerd", "mount", "--root", str(fuzz_paths.garbage_root), "x", "y"],
        ["containerd", "mount", "--root", str(fuzz_paths.empty_root), "img", "m"],
        ["containerd", "verify", "--root", str(fuzz_paths.file)],
        ["containerd", "check", "--root", str(fuzz_paths.missing)],
        ["--bogus"],
        ["\udcff"],
    ]
    problems = run_batch(fuzz_paths, junk_inputs)
    codes = [run_cli(a, fuzz_paths.root)[0] for a in junk_inputs[:3]]
    record("cli", "fixed bad inputs, every command", len(junk_inputs), len(problems))
    assert not problems, "\n".join(problems)
    assert all(c != 0 for c in codes)


@pytest.mark.soak
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("which", ["mount", "umount", "containerd"])
def test_fuzz_soak(fuzz_paths: Paths, which: str) -> None:
    strategy = {"mount": mount_argv, "umount": umount_argv, "containerd": containerd_argv}[which]
    many = settings(FUZZ_SETTINGS, max_examples=int(os.environ.get("PYOVERLAY_FUZZ_SOAK", "60")))

    @many
    @given(st.data())
    def check(data: st.DataObject) -> None:
        batch = data.draw(st.lists(strategy(fuzz_paths), min_size=BATCH, max_size=BATCH))
        problems = run_batch(fuzz_paths, batch)
        assert not problems, problems[0]

    start = COUNTS["tried"]
    check()
    record("cli", f"fuzzed {which} arguments (soak)", COUNTS["tried"] - start, 0)
