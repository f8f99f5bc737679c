"""The live daemon: our reading of meta.db matches what containerd itself reports."""

from __future__ import annotations

import pytest

from .ctrd_env import MULTI, PAUSE, CtrdEnv, run_cli
from .ctrd_images import chain_id

pytestmark = [pytest.mark.containerd, pytest.mark.timeout(120)]


def test_images_match_containerd(ctrd: CtrdEnv) -> None:
    res = run_cli("containerd", "images", "--root", ctrd.daemon.root, "--json")
    assert res.code == 0, res.err
    got = {(i["namespace"], i["name"]): i for i in res.json()["images"]}
    assert set(got) == set(ctrd.info)
    for key, info in ctrd.info.items():
        image = got[key]
        assert [layer["digest"] for layer in image["layers"]] == info["layers"]
        assert [layer["diff_id"] for layer in image["layers"]] == info["diff_ids"]
        dirs = [layer["directory"] for layer in image["layers"]]
        assert dirs == [f"{ctrd.daemon.root}/{d}" for d in ctrd.layer_dirs[key]]
        assert all(layer["exists"] for layer in image["layers"])
    # The same layer unpacked in two namespaces lives in two directories.
    assert ctrd.layer_dirs[("default", PAUSE)] != ctrd.layer_dirs[("k8s.io", PAUSE)]
    assert len(got[("default", MULTI)]["layers"]) == 3


def test_reads_consistently_while_containerd_writes(ctrd: CtrdEnv) -> None:
    """containerd commits transactions (snapshots created and removed) while we read."""
    import threading
    import time

    from pyoverlay.containerd.store import ContainerdRoot

    chain = chain_id(ctrd.info[("default", MULTI)]["diff_ids"])
    stop = threading.Event()
    writes = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            key = f"churn-{i}"
            ctrd.daemon.ctr("snapshots", "--snapshotter", "overlayfs", "prepare", key, chain)
            ctrd.daemon.ctr("snapshots", "--snapshotter", "overlayfs", "rm", key)
            writes.append(i)
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    reads = 0
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline or len(writes) < 3:
            root = ContainerdRoot(ctrd.daemon.root)
            target = root.resolve(MULTI)
            assert [s.fs for s in target.chain] == [
                f"{ctrd.daemon.root}/{d}" for d in reversed(ctrd.layer_dirs[("default", MULTI)])
            ]
            reads += 1
    finally:
        stop.set()
        thread.join(timeout=60)
    assert len(writes) >= 3 and reads >= 10


@pytest.mark.parametrize("how", ["snapshot-id", "snapshot-key", "chain-key", "short-name"])
def test_mount_resolves_every_kind_of_name(ctrd: CtrdEnv, how: str) -> None:
    from pyoverlay.containerd.store import ContainerdRoot

    dirs = [f"{ctrd.daemon.root}/{d}" for d in reversed(ctrd.layer_dirs[("default", MULTI)])]
    top = ContainerdRoot(ctrd.daemon.root).snapshot_for_key(
        "default", chain_id(ctrd.info[("default", MULTI)]["diff_ids"])
    )
    assert top is not None and top.fs == dirs[0]
    name = {
        "snapshot-id": str(top.id),
        "snapshot-key": top.name,
        "chain-key": chain_id(ctrd.info[("default", MULTI)]["diff_ids"]),
        "short-name": "test/multi:1",
    }[how]
    res = run_cli("containerd", "mount", "--print-lowerdir", name, "x", "--root", ctrd.daemon.root)
    assert res.code == 0, res.err
    assert res.out.strip() == ":".join(dirs)


def test_pause_in_two_namespaces_needs_no_guessing(ctrd: CtrdEnv) -> None:
    res = run_cli(
        "containerd", "mount", "--print-lowerdir", "pause:3.9", "x", "--root", ctrd.daemon.root
    )
    assert res.code == 0
    assert res.out.strip() == f"{ctrd.daemon.root}/{ctrd.layer_dirs[('default', PAUSE)][0]}"
    assert "also in k8s.io" in res.err
    res = run_cli(
        "containerd",
        "mount",
        "--print-lowerdir",
        "-n",
        "k8s.io",
        "pause:3.9",
        "x",
        "--root",
        ctrd.daemon.root,
    )
    assert res.out.strip() == f"{ctrd.daemon.root}/{ctrd.layer_dirs[('k8s.io', PAUSE)][0]}"
    assert res.err == ""


def test_progress_bar_only_on_a_terminal(ctrd: CtrdEnv) -> None:
    import os
    import subprocess
    import sys

    from .ctrd_env import REPO_ROOT

    master, slave = os.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pyoverlay", "containerd", "check", "--root", ctrd.daemon.root],
            stdout=subprocess.PIPE,
            stderr=slave,
            timeout=60,
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        )
        os.close(slave)
        slave = -1
        err = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            err += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert proc.returncode == 0
    assert b"[" in err and b"%" in err  # drawn on the terminal...
    assert b"[" not in proc.stdout and proc.stdout.decode().startswith("checked ")  # ...not here


def test_discarded_layer_blob_is_not_a_problem(ctrd: CtrdEnv, tmp_path) -> None:
    """CRI's discard_unpacked_layers: blob and record gone, snapshot still there."""
    from .ctrd_images import Entry, image_tar

    data, info = image_tar("docker.io/test/discard:1", [([Entry("f", data=b"x")], "gzip")])
    (tmp_path / "d.tar").write_bytes(data)
    ctrd.daemon.import_image(str(tmp_path / "d.tar"), namespace="discard")
    ctrd.daemon.ctr("content", "rm", info["layers"][0], namespace="discard")
    # containerd's garbage collector removes the blob file shortly after the record.
    import os
    import time

    blob = f"{ctrd.daemon.root}/io.containerd.content.v1.content/blobs/sha256/"
    blob += info["layers"][0].split(":")[1]
    deadline = time.monotonic() + 20
    while os.path.exists(blob) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(blob), "containerd did not collect the blob"
    res = run_cli("containerd", "verify", "--all", "-n", "discard", "--root", ctrd.daemon.root)
    assert res.code == 0, res.out
    assert "not checked: its blob was discarded after unpacking" in res.out
    assert res.out.strip().endswith("0 problems; 1 layers not checked (blob discarded)")
    res = run_cli("containerd", "check", "--root", ctrd.daemon.root)
    assert res.code == 0, res.out


def _fuzz_real_db(path: str, examples: int) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from pyoverlay.containerd.bolt import BoltDB, BoltError

    with open(path, "rb") as f:
        original = f.read()

    def dump(bucket) -> int:
        return sum(1 if isinstance(v, bytes) else 1 + dump(v) for _k, v in bucket.items())

    @settings(max_examples=examples, deadline=2000, suppress_health_check=list(HealthCheck))
    @given(
        edits=st.lists(
            st.tuples(st.integers(0, len(original) - 1), st.integers(0, 255)), max_size=12
        ),
        cut=st.one_of(st.none(), st.integers(0, len(original))),
    )
    def run(edits, cut) -> None:
        data = bytearray(original)
        for offset, value in edits:
            data[offset] = value
        if cut is not None:
            del data[cut:]
        try:
            dump(BoltDB(bytes(data), "meta.db").root)
        except BoltError as exc:
            assert "\n" not in str(exc)

    assert dump(BoltDB(original).root) > 20  # the real file parses and is not trivial
    run()


@pytest.mark.parametrize("db", ["meta", "snapshotter"])
def test_fuzz_real_containerd_databases(ctrd: CtrdEnv, db: str) -> None:
    sub = {
        "meta": "io.containerd.metadata.v1.bolt/meta.db",
        "snapshotter": "io.containerd.snapshotter.v1.overlayfs/metadata.db",
    }[db]
    _fuzz_real_db(str(ctrd.pristine / sub), 100)


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_fuzz_real_meta_db_soak(ctrd: CtrdEnv) -> None:
    _fuzz_real_db(str(ctrd.pristine / "io.containerd.metadata.v1.bolt/meta.db"), 5000)
