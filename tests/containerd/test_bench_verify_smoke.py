"""The verify benchmark runs and reports sane numbers; never how fast they are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_verify.py"


@pytest.mark.timeout(120)
def test_bench_verify_smallest_mode(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--size-mb",
            "2",
            "--repeat",
            "1",
            "--json",
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["compression"] for r in rows] == ["gzip", "zstd", "plain"]
    for row in rows:
        assert 1.5 < row["uncompressed_mb"] < 4 and row["mb_per_s"] > 0
    assert list(tmp_path.iterdir()) == []  # the bench cleans up after itself
