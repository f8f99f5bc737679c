"""Packaging: the installed console script, ``python -m pyoverlay`` and the CLI's usage errors.

These run the real interpreter in subprocesses; no mounts.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pyoverlay
import pyoverlay.cli

REPO = Path(__file__).resolve().parent.parent


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``args`` with this checkout importable, whatever the current directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def project_version() -> str:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def test_console_script_resolves_to_cli_main(tmp_path: Path) -> None:
    (entry_point,) = importlib.metadata.entry_points(group="console_scripts", name="pyoverlay")
    assert entry_point.value == "pyoverlay.cli:main"
    assert entry_point.load() is pyoverlay.cli.main
    script = Path(sysconfig.get_path("scripts")) / "pyoverlay"
    result = run([str(script), "--version"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"pyoverlay {project_version()}"
    assert importlib.metadata.version("pyoverlay") == project_version()


def test_module_version_matches_project(tmp_path: Path) -> None:
    result = run([sys.executable, "-m", "pyoverlay", "--version"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    version = project_version()
    assert result.stdout.strip() == f"pyoverlay {version}"
    assert pyoverlay.__version__ == version


def test_mount_without_arguments_is_a_one_line_usage_error(tmp_path: Path) -> None:
    result = run([sys.executable, "-m", "pyoverlay", "mount"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pyoverlay: ")
    assert "Traceback" not in result.stderr
