"""Shared pieces of the containerd tests: the environment, CLI runners, fingerprints."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from pyoverlay.cli import main

from .ctrd_daemon import Containerd
from .ctrd_images import multi_layers, pause_layers

REPO_ROOT = Path(__file__).resolve().parents[3]
PAUSE = "docker.io/library/pause:3.9"
MULTI = "docker.io/test/multi:1"
MULTIARCH = "docker.io/test/multiarch:2"
IMAGES = [
    ("default", PAUSE, pause_layers),
    ("default", MULTI, multi_layers),
    ("k8s.io", PAUSE, pause_layers),
]


@dataclasses.dataclass
class CtrdEnv:
    daemon: Containerd
    pristine: Path
    #: (namespace, image) -> snapshot fs dirs, base layer first, relative to the root.
    layer_dirs: dict[tuple[str, str], list[str]]
    #: (namespace, image) -> image_tar info (layer digests, diff_ids, ...)
    info: dict[tuple[str, str], dict]

    def copy(self, dest: Path) -> Path:
        """A private ``cp -a`` copy of the untouched root."""
        subprocess.run(["cp", "-a", str(self.pristine), str(dest)], check=True)
        return dest

    def copy_with_stale_atimes(self, dest: Path) -> Path:
        """A copy in which any read that is not O_NOATIME will change an atime.

        With relatime the kernel updates an atime only when it is not newer than the
        mtime (or is a day old); earlier reads of the pristine root may have left
        atimes newer, so set each one just below its mtime.
        """
        self.copy(dest)
        for path in [dest, *dest.rglob("*")]:
            st = os.lstat(path)
            os.utime(path, ns=(st.st_mtime_ns - 10**9, st.st_mtime_ns), follow_symlinks=False)
        return dest


@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> dict:
        return json.loads(self.out)


def run_cli(*args: str) -> Result:
    """``pyoverlay ARGS`` in-process, with its exit code and output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return Result(code, out.getvalue(), err.getvalue())


def run_cli_process(*args: str, timeout: float = 120) -> Result:
    """``python -m pyoverlay ARGS`` as a real process."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    res = subprocess.run(
        [sys.executable, "-m", "pyoverlay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    return Result(res.returncode, res.stdout, res.stderr)


def _read_noatime(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def fingerprint(top: Path) -> dict[str, tuple]:
    """Everything about a tree we promise not to change, read without touching atimes.

    Symlink atimes are left out: readlink(2) updates them and nothing can prevent that.
    """
    result: dict[str, tuple] = {}
    stats: list[tuple[str, os.stat_result]] = []
    stack = [str(top)]
    while stack:
        current = stack.pop()
        st = os.lstat(current)
        stats.append((current, st))
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(current, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
            try:
                stack.extend(os.path.join(current, n) for n in os.listdir(fd))
            finally:
                os.close(fd)
    for path, st in stats:  # all lstat calls first: reading content comes after
        mode = st.st_mode
        atime = None if stat.S_ISLNK(mode) else st.st_atime_ns
        content = None
        if stat.S_ISREG(mode):
            content = hashlib.sha256(_read_noatime(path)).hexdigest()
        elif stat.S_ISLNK(mode):
            content = os.readlink(path)
        xattrs = {
            k: os.getxattr(path, k, follow_symlinks=False)
            for k in os.listxattr(path, follow_symlinks=False)
        }
        result[os.path.relpath(path, top)] = (
            mode,
            st.st_uid,
            st.st_gid,
            st.st_size,
            st.st_mtime_ns,
            atime,
            st.st_rdev,
            content,
            sorted(xattrs.items()),
        )
    return result
