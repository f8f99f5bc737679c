"""A real containerd for the containerd tests, its pristine state, and helpers.

The session fixture starts Debian's containerd privately, imports our offline-built
images, stops it and keeps a ``cp -a`` copy of the untouched root (tests damage copies
of that), then starts it again for tests that need the live daemon. containerd itself
is asked (``ctr snapshots prepare --mounts``) which directories make up each image, so
the tests do not depend on our own resolution code to find them.
"""

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
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ctrd_daemon import Containerd
from ctrd_images import Entry, chain_id, image_tar, index_image_tar, multi_layers, pause_layers

from pyoverlay.cli import main

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


def _oracle_dirs(daemon: Containerd, namespace: str, top_chain: str, n: int) -> list[str]:
    """Ask containerd for the lowerdir of an image's top layer, base first."""
    key = f"oracle-{hashlib.sha256((namespace + top_chain).encode()).hexdigest()[:12]}"
    out = daemon.ctr(
        "snapshots",
        "--snapshotter",
        "overlayfs",
        "prepare",
        "--mounts",
        key,
        top_chain,
        namespace=namespace,
    )
    mounts = json.loads(out)
    options = [o for m in mounts for o in m.get("Options") or m.get("options") or []]
    lower = next(o for o in options if o.startswith("lowerdir="))[len("lowerdir=") :]
    dirs = [os.path.relpath(d, daemon.root) for d in lower.split(":")]
    daemon.ctr("snapshots", "--snapshotter", "overlayfs", "rm", key, namespace=namespace)
    assert len(dirs) == n, (dirs, n)
    return list(reversed(dirs))


@pytest.fixture(scope="session")
def ctrd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CtrdEnv]:
    base = tmp_path_factory.mktemp("containerd")
    daemon = Containerd(str(base))
    try:
        daemon.start()
        info = {}
        for namespace, name, layers in IMAGES:
            data, meta = image_tar(name, layers())
            tar = base / f"{namespace}-{name.replace('/', '_')}.tar"
            tar.write_bytes(data)
            daemon.import_image(str(tar), namespace=namespace)
            info[(namespace, name)] = meta
        # A multi-platform index: only this machine's manifest is unpacked.
        data, metas = index_image_tar(
            MULTIARCH,
            {arch: [([Entry("arch", data=arch.encode())], "gzip")] for arch in ("arm64", "amd64")},
        )
        (base / "multiarch.tar").write_bytes(data)
        daemon.import_image(str(base / "multiarch.tar"))
        info[("default", MULTIARCH)] = metas["amd64"]
        daemon.stop()
        pristine = base / "pristine"
        subprocess.run(["cp", "-a", daemon.root, str(pristine)], check=True)
        daemon.start()
        layer_dirs = {
            key: _oracle_dirs(daemon, key[0], chain_id(meta["diff_ids"]), len(meta["diff_ids"]))
            for key, meta in info.items()
        }
        yield CtrdEnv(daemon, pristine, layer_dirs, info)
    finally:
        daemon.cleanup()


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
