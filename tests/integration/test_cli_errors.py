"""Bad input to ``pyoverlay mount``: one clear line, a non-zero exit, nothing mounted.

Each case builds a small broken setup under tmp_path and runs the real command, in the
foreground form and in the default (backgrounding) form. mounts.run_mount_expecting_failure
unmounts and ends anything a wrongly accepted input started, so a failing case leaks
nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mounts import (
    daemon_env,
    end_process,
    mounts_at,
    pyoverlay_command,
    run_mount_expecting_failure,
    tmpfs,
)

pytestmark = pytest.mark.timeout(60)


@dataclasses.dataclass
class Case:
    """The arguments to run, where they mount, and what the one error line must contain."""

    args: list[str]
    merged: Path
    #: The line must name one of these paths (or words, for options).
    names: list[str]
    #: And match this (case-insensitive) regex, which says what the problem is.
    problem: str
    code: int = 1
    #: Files a refused mount must leave alone.
    survivors: list[Path] = dataclasses.field(default_factory=list)


MISSING = r"no such|not exist|missing|not found"
NOT_DIR = r"not a directory"
NESTED = r"inside|within|overlap|nested|subdir|beneath|under|same"


def _dirs(tmp: Path, *names: str) -> list[Path]:
    paths = [tmp / n for n in names]
    for p in paths:
        p.mkdir(parents=True, exist_ok=True)
    return paths


def _standard(tmp: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, work, merged = _dirs(tmp, "lower", "upper", "work", "merged")
    (lower / "file").write_text("x\n")
    return lower, upper, work, merged


def _positional(lower: Path | str, upper: Path, work: Path, merged: Path) -> list[str]:
    return [str(lower), str(upper), str(work), str(merged)]


def case_lower_missing(tmp: Path, stack: contextlib.ExitStack) -> Case:
    _, upper, work, merged = _standard(tmp)
    bad = tmp / "no-such-lower"
    return Case(_positional(bad, upper, work, merged), merged, [str(bad)], MISSING)


def case_lower_not_dir(tmp: Path, stack: contextlib.ExitStack) -> Case:
    lower, upper, work, merged = _standard(tmp)
    bad = lower / "file"
    return Case(_positional(bad, upper, work, merged), merged, [str(bad)], NOT_DIR)


def case_middle_lower_missing(tmp: Path, stack: contextlib.ExitStack) -> Case:
    lower, upper, work, merged = _standard(tmp)
    (other,) = _dirs(tmp, "other")
    bad = tmp / "gone"
    lowers = f"{lower}:{bad}:{other}"
    return Case(_positional(lowers, upper, work, merged), merged, [str(bad)], MISSING)


def case_upper_missing(tmp: Path, stack: contextlib.ExitStack) -> Case:
    lower, _, work, merged = _standard(tmp)
    bad = tmp / "no-such-upper"
    return Case(_positional(lower, bad, work, merged), merged, [str(bad)], MISSING)


def case_upper_not_dir(tmp: Path, stack: contextlib.ExitStack) -> Case:
    lower, _, work, merged = _standard(tmp)
    bad = tmp / "upper-file"
    bad.write_text("")
    return Case(_positional(lower, bad, work, merged), merged, [str(bad)], NOT_DIR)


def case_work_missing(tmp: Path, stack: contextlib.ExitStack) -> Case:
    lower, upper, _, merged = _standard(tmp)
    bad = tmp / "no-such-work"
    return Case(_positional(lower, upper, bad, merged), merged, [str(bad)], MISSING)


def case_merged_missing(tmp: Path, stack: contextlib.ExitStack) -> Case:
    lower, upper, work, _ = _standard(tmp)
    bad = tmp / "no-such-merged"
    return Case(_positional(lower, upper, work, bad), bad, [str(bad)], MISSING)


def case_merged_not_dir(tmp: Path, stack: contextlib.ExitStack) -> Case:
    lower, upper, work, _ = _standard(tmp)
    bad = tmp / "merged-file"
    bad.write_text("")
    return Case(_positional(lower, upper, work, bad), bad, [str(bad)], NOT_DIR)


def case_merged_is_mount_point(tmp: Path, stack: contextlib.ExitStack) -> Case:
    lower, upper, work, merged = _standard(tmp)
    stack.enter_context(tmpfs(merged))
    return Case(_positional(lower, upper, work, merged), merged, [str(merged)], r"mount")


def case_work_not_empty(tmp: Path, stack: contextlib.ExitStack) -> Case:
    lower, upper, work, merged = _standard(tmp)
    (work / "leftover").write_text("x")
    return Case(_positional(lower, upper, work, merged), merged, [str(work)], r"empty")


def case_work_on_other_fs(tmp: Path, stack: contextlib.ExitStack) -> Case:
    lower, upper, _, merged = _standard(tmp)
    (fs,) = _dirs(tmp, "small-fs")
    stack.enter_context(tmpfs(fs))
    work = fs / "work"
    work.mkdir()
    return Case(
        _positional(lower, upper, work, merged),
        merged,
        [str(work), str(upper)],
        r"file ?system|device|same fs|mount",
    )


def case_upper_inside_lower(tmp: Path, stack: contextlib.ExitStack) -> Case:
    lower, _, work, merged = _standard(tmp)
    (upper,) = _dirs(lower, "up")
    return Case(_positional(lower, upper, work, merged), merged, [str(upper), str(lower)], NESTED)


def case_upper_is_lower(tmp: Path, stack: contextlib.ExitStack) -> Case:
    lower, _, work, merged = _standard(tmp)
    return Case(_positional(lower, lower, work, merged), merged, [str(lower)], NESTED)


def case_lower_inside_upper(tmp: Path, stack: contextlib.ExitStack) -> Case:
    _, upper, work, merged = _standard(tmp)
    (lower,) = _dirs(upper, "low")
    return Case(_positional(lower, upper, work, merged), merged, [str(upper), str(lower)], NESTED)


def case_work_inside_lower(tmp: Path, stack: contextlib.ExitStack) -> Case:
    lower, upper, _, merged = _standard(tmp)
    (work,) = _dirs(lower, "wk")
    return Case(_positional(lower, upper, work, merged), merged, [str(work), str(lower)], NESTED)


def case_lower_inside_work(tmp: Path, stack: contextlib.ExitStack) -> Case:
    _, upper, work, merged = _standard(tmp)
    # Inside work/work, which an earlier mount may leave behind and so does not make
    # the work dir count as "not empty": the overlap itself must be the complaint.
    (lower,) = _dirs(work, "work/low")
    (lower / "keep").write_text("must survive\n")
    args = _positional(lower, upper, work, merged)
    return Case(args, merged, [str(work), str(lower)], NESTED, survivors=[lower / "keep"])


def case_work_inside_upper(tmp: Path, stack: contextlib.ExitStack) -> Case:
    lower, upper, _, merged = _standard(tmp)
    (work,) = _dirs(upper, "wk")
    return Case(_positional(lower, upper, work, merged), merged, [str(work), str(upper)], NESTED)


def case_unknown_option(tmp: Path, stack: contextlib.ExitStack) -> Case:
    lower, upper, work, merged = _standard(tmp)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work},bogus_option=1"
    return Case(["-o", opts, str(merged)], merged, ["bogus_option"], r"unknown|invalid", 2)


def case_options_form_work_missing(tmp: Path, stack: contextlib.ExitStack) -> Case:
    lower, upper, _, merged = _standard(tmp)
    bad = tmp / "absent-work"
    opts = f"lowerdir={lower},upperdir={upper},workdir={bad}"
    return Case(["-o", opts, str(merged)], merged, [str(bad)], MISSING)


def case_read_only_lower_missing(tmp: Path, stack: contextlib.ExitStack) -> Case:
    _, _, _, merged = _standard(tmp)
    bad = tmp / "no-such-ro-lower"
    return Case(["--read-only", str(bad), str(merged)], merged, [str(bad)], MISSING)


CASES: dict[str, Callable[[Path, contextlib.ExitStack], Case]] = {
    name.removeprefix("case_"): func for name, func in globals().items() if name.startswith("case_")
}


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as s:
        yield s


@pytest.mark.parametrize("foreground", [True, False], ids=["foreground", "background"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_refused(
    name: str, foreground: bool, tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    case = CASES[name](tmp_path, stack)
    mounts_before = mounts_at(case.merged) if case.merged.is_dir() else []
    code, stderr, mounted = run_mount_expecting_failure(
        case.args, case.merged, foreground=foreground
    )
    assert not mounted, f"mounted despite bad input; output: {stderr}"
    assert code == case.code, f"exit code {code}, output: {stderr}"
    _assert_one_clear_line(stderr, case)
    if case.merged.is_dir():
        assert mounts_at(case.merged) == mounts_before
    assert [p for p in case.survivors if not p.exists()] == []


def _assert_one_clear_line(stderr: str, case: Case) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    line = lines[0]
    assert any(n in line for n in case.names), f"{line!r} names none of {case.names}"
    assert re.search(case.problem, line, re.IGNORECASE), f"{line!r} does not say {case.problem}"


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pyoverlay", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=daemon_env(), timeout=30)


@pytest.mark.parametrize(
    "args",
    [[], ["mount"], ["mount", "a", "b", "c"], ["mount", "--no-such-flag", "x", "y"]],
    ids=["nothing", "mount-no-paths", "mount-three-paths", "unknown-flag"],
)
def test_usage_errors(args: list[str]) -> None:
    res = _run_cli(*args)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_umount_of_a_plain_directory(tmp_path: Path) -> None:
    res = _run_cli("umount", str(tmp_path))
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path) in lines[0], res.stderr


@pytest.mark.parametrize("foreground", [True, False], ids=["foreground", "background"])
def test_no_dev_fuse(foreground: bool, tmp_path: Path) -> None:
    """Without /dev/fuse: one line naming it, exit 1 (run in a private mount namespace)."""
    lower, upper, work, merged = _standard(tmp_path)
    args = pyoverlay_command(_positional(lower, upper, work, merged), foreground=foreground)
    # A tmpfs over /dev, visible only inside the new namespace, hides /dev/fuse. Anything
    # the command might wrongly mount there dies with the namespace when it is ended.
    script = 'mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3 && exec "$@"'
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=daemon_env()
    )
    try:
        _, stderr = proc.communicate(timeout=30)
    finally:
        end_process(proc)
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "/dev/fuse" in lines[0], stderr
