"""Concurrency: several processes hammer overlapping names; no hang, no wrong data.

The exerciser (fsx.py) runs its workers against a real pyoverlay mount and a shadow
tree on the plain file system; every answer and every byte read back is compared. A
watchdog fails the test (and aborts the FUSE connection) if the workers stop making
progress. Afterwards the merged tree must equal the shadow, also after a remount.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import fsx
from reliability_util import Daemon, make_layout, record


def compare_with_shadow(merged: Path, shadow: Path) -> list[str]:
    problems = []
    for name in fsx.NAMES:
        mine, want = merged / name, shadow / name
        if os.path.lexists(mine) != os.path.lexists(want):
            problems.append(
                f"{name}: exists {os.path.lexists(mine)}, expected {os.path.lexists(want)}"
            )
        elif want.is_dir() != mine.is_dir():
            problems.append(f"{name}: directory {mine.is_dir()}, expected {want.is_dir()}")
        elif want.is_file() and mine.read_bytes() != want.read_bytes():
            problems.append(f"{name}: content differs")
    for i, name in enumerate(fsx.RO_NAMES):
        if (merged / name).read_bytes() != fsx.ro_data(i):
            problems.append(f"{name}: content changed")
    for d in fsx.DIRS:
        extra = set(os.listdir(merged / d)) - set(os.listdir(shadow / d))
        if extra:
            problems.append(f"{d}: unexpected names {sorted(extra)}")
    return problems


def exercise(tmp: Path, *, procs: int, ops: int, seed: str) -> None:
    layout = make_layout(tmp / "ov")
    shadow = tmp / "shadow"
    fsx.populate(layout.lowers, shadow)
    with Daemon(layout.args(), layout.merged) as daemon:
        summary = fsx.run_with_watchdog(
            layout.merged,
            shadow,
            tmp / "fsx",
            procs=procs,
            ops=ops,
            seed=seed,
            daemon_pid=daemon.pid,
        )
        alive = daemon.alive()
        problems = (
            compare_with_shadow(layout.merged, shadow) if alive and not summary["hang"] else []
        )
    detail = f"{procs} processes, {summary['seconds']:.0f}s; ops {summary['counts']}"
    lost = len(summary["failures"]) + len(problems) + bool(summary["hang"]) + (not alive)
    record(
        "concurrency", f"fsx: random ops, {procs} processes", summary["operations"], lost, detail
    )
    assert not summary["hang"], summary["hang"]
    assert alive, f"daemon died:\n{daemon.output()}"
    assert not summary["failures"], summary["failures"]
    assert summary["returncode"] == 0, summary
    assert not problems, problems
    with Daemon(layout.args(), layout.merged):
        assert compare_with_shadow(layout.merged, shadow) == []


@pytest.mark.timeout(180)
def test_fsx_overlapping_names(tmp_path: Path) -> None:
    exercise(tmp_path, procs=4, ops=400, seed="default")


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_fsx_soak(tmp_path: Path) -> None:
    ops = int(os.environ.get("PYOVERLAY_FSX_OPS", "5000"))
    exercise(tmp_path, procs=6, ops=ops, seed="soak")


@pytest.mark.timeout(120)
def test_watchdog_catches_a_hung_daemon(tmp_path: Path) -> None:
    """The watchdog itself: a daemon that stops answering (SIGSTOP) is reported as a hang,
    the blocked workers are freed by aborting the connection, and nothing is left."""
    layout = make_layout(tmp_path / "ov")
    shadow = tmp_path / "shadow"
    fsx.populate(layout.lowers, shadow)
    with Daemon(layout.args(), layout.merged) as daemon:
        stopper = threading.Timer(1.0, os.kill, (daemon.pid, signal.SIGSTOP))
        stopper.start()
        try:
            summary = fsx.run_with_watchdog(
                layout.merged,
                shadow,
                tmp_path / "fsx",
                procs=2,
                ops=100_000,
                seed="hang",
                stall=3.0,
                daemon_pid=daemon.pid,
            )
        finally:
            stopper.cancel()
            os.kill(daemon.pid, signal.SIGCONT)
    assert summary["hang"].startswith("no progress"), summary
    assert summary["returncode"] != 0
