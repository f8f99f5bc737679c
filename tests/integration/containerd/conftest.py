"""A real containerd for the containerd tests, and its pristine state.

The session fixture starts Debian's containerd privately, imports our offline-built
images, stops it and keeps a ``cp -a`` copy of the untouched root (tests damage copies
of that), then starts it again for tests that need the live daemon. containerd itself
is asked (``ctr snapshots prepare --mounts``) which directories make up each image, so
the tests do not depend on our own resolution code to find them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from .ctrd_daemon import Containerd
from .ctrd_env import IMAGES, MULTIARCH, CtrdEnv
from .ctrd_images import Entry, chain_id, image_tar, index_image_tar


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
