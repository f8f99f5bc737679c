"""Smoke test of the benchmark harness: its smallest mode against kernel overlayfs and plain.

Checks the shape of the report and that the numbers are sane; never how fast anything is.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "bench" / "run.py"
TARGETS = ("kernel", "plain")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts overlays: needs root")


def _mounts_under(path: Path) -> list[str]:
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == str(path) or mp.startswith(f"{path}/"):
                found.append(mp)
    return found


@pytest.fixture
def bench_dir(tmp_path: Path):
    yield tmp_path
    # If the harness was killed, its atexit teardown never ran: unmount what it left.
    for mp in sorted(_mounts_under(tmp_path), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], check=False)


def _run_harness(tmp: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(RUN),
        "--quick",
        "--runs",
        "1",
        "--targets",
        ",".join(TARGETS),
        "--workdir",
        str(tmp / "work"),
        "--out",
        str(tmp / "out"),
        "--no-chart",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)


def _table_rows(report: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in report.splitlines() if ln.startswith("| workload |")]
    assert len(lines) == 1, "exactly one timed table expected"
    all_lines = report.splitlines()
    start = all_lines.index(lines[0])
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for ln in all_lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return header, rows


@pytest.mark.timeout(280)
def test_quick_run_reports_every_workload(bench_dir: Path) -> None:
    res = _run_harness(bench_dir)
    assert res.returncode == 0, res.stderr[-2000:] + res.stdout[-2000:]
    assert _mounts_under(bench_dir) == [], "the harness left mounts behind"

    results = json.loads((bench_dir / "out" / "results.json").read_text())
    assert results["skipped"] == {}
    assert [m for m in results["measurements"] if "error" in m] == []
    timed = [n for n in results["workloads"] if results["kinds"][n] == "time"]
    assert len(timed) == 13
    for name in timed:
        for target in TARGETS:
            seconds = results["medians"][name][target]["seconds"]
            assert math.isfinite(seconds) and seconds > 0, (name, target, seconds)

    # Same fixture on every target: the walks see the same number of entries.
    expected = results["fixture"]["merged_entries"]
    for target in TARGETS:
        assert results["medians"]["walk_cold"][target]["entries"] == expected
        assert (
            results["medians"]["readdir_cold"][target]["entries"]
            == (results["sizes"]["bigdir_entries"])
        )
    latency = results["medians"]["copyup_stat_p99"]["kernel"]
    assert latency["samples"] > 0 and 0 < latency["p99_ms"] <= latency["max_ms"]

    header, rows = _table_rows((bench_dir / "out" / "report.md").read_text())
    assert header == ["workload", "kernel (s)", "plain (s)", "plain / kernel"]
    assert [r[0] for r in rows] == [results["labels"][n] for n in timed]
    for row in rows:
        assert float(row[1]) > 0 and float(row[2]) > 0
        assert row[3].endswith("x") and float(row[3][:-1]) > 0
