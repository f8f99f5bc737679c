"""cache=none: a change made in a lower layer while mounted is seen at once."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.integration.mounts import pyoverlay_mount

pytestmark = pytest.mark.timeout(60)


def layers(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    (lower / "a").write_text("one")
    (lower / "dir").mkdir()
    (lower / "dir" / "old").write_text("old")
    return lower, upper, work, merged


def mount_args(tmp_path: Path, extra: str) -> list[str]:
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}{extra}"
    return ["-o", opts, str(merged)]


def test_lower_changes_are_seen_at_once(tmp_path: Path) -> None:
    lower, _, _, merged = layers(tmp_path)
    with pyoverlay_mount(mount_args(tmp_path, ",cache=none"), merged):
        assert (merged / "a").read_text() == "one"
        assert not (merged / "new").exists()
        assert sorted(os.listdir(merged / "dir")) == ["old"]

        (lower / "a").write_text("two-two")
        (lower / "new").write_text("fresh")
        shutil.rmtree(lower / "dir")
        (lower / "dir").mkdir()
        (lower / "dir" / "replaced").write_text("r")

        assert (merged / "a").read_text() == "two-two"
        assert os.stat(merged / "a").st_size == 7
        assert (merged / "new").read_text() == "fresh"
        assert sorted(os.listdir(merged / "dir")) == ["replaced"]


def test_default_caching_keeps_a_negative_entry(tmp_path: Path) -> None:
    """The control: with the kernel caches on, a name looked up as missing stays missing
    for the entry timeout, which is why cache=none exists."""
    lower, _, _, merged = layers(tmp_path)
    with pyoverlay_mount(mount_args(tmp_path, ""), merged):
        assert not (merged / "new").exists()
        (lower / "new").write_text("fresh")
        assert not (merged / "new").exists()
