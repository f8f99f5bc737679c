"""verify and check on damaged copies of a real containerd root: exactly the damage, no more.

Each test copies the pristine root (made while containerd was stopped), damages the copy
in one way, and requires the commands to report that and nothing else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .ctrd_env import MULTI, PAUSE, CtrdEnv, fingerprint, run_cli, run_cli_process

pytestmark = [pytest.mark.containerd, pytest.mark.timeout(120)]


def findings(report: dict) -> set[tuple]:
    """(namespace, image, layer index, snapshot dir, kind, path) for every finding."""
    found = set()
    for image in report["images"]:
        for f in image["findings"]:
            found.add((image["namespace"], image["name"], None, None, f["kind"], f["path"]))
        for layer in image["layers"]:
            for f in layer["findings"]:
                found.add(
                    (
                        image["namespace"],
                        image["name"],
                        layer["index"],
                        layer["directory"],
                        f["kind"],
                        f["path"],
                    )
                )
    return found


@pytest.fixture
def root(ctrd: CtrdEnv, tmp_path: Path) -> Path:
    return ctrd.copy(tmp_path / "root")


def layer_dir(ctrd: CtrdEnv, root: Path, namespace: str, image: str, index: int) -> Path:
    return root / ctrd.layer_dirs[(namespace, image)][index]


def verify_all(root: Path) -> tuple[int, set[tuple], dict]:
    res = run_cli("containerd", "verify", "--all", "--root", str(root), "--json")
    assert not res.err, res.err
    report = res.json()
    return res.code, findings(report), report


def test_pristine_copy_is_clean(ctrd: CtrdEnv, root: Path) -> None:
    code, found, report = verify_all(root)
    assert (code, found) == (0, set())
    assert report["problems"] == 0
    assert len(report["images"]) == len(ctrd.info) == 4
    res = run_cli("containerd", "check", "--root", str(root))
    assert (res.code, res.out.strip().splitlines()[-1]) == (0, f"checked {root}: clean")


def test_incident_missing_pause_is_named_in_the_right_snapshot(ctrd: CtrdEnv, root: Path) -> None:
    snap = layer_dir(ctrd, root, "k8s.io", PAUSE, 0)
    (snap / "pause").unlink()
    code, found, _ = verify_all(root)
    assert code == 1
    assert found == {("k8s.io", PAUSE, 0, str(snap), "missing", "/pause")}
    # The text report, from a real process, names the file and the directory.
    # The incident's one command: no arguments means every image.
    res = run_cli_process("containerd", "verify", "--root", str(root))
    assert res.code == 1, res.err
    assert f"in {snap}" in res.out
    assert "missing: /pause: regular file" in res.out
    assert res.out.strip().splitlines()[-1].endswith(": 1 problem")
    # The same image in the default namespace is fine.
    res = run_cli("containerd", "verify", "-n", "default", "pause:3.9", "--root", str(root))
    assert res.code == 0, res.out


DAMAGE = {
    # name: (image, layer, shell-free damage function, expected (kind, path) findings)
    "edit-content": (MULTI, 0, lambda d: _append(d / "etc/passwd"), {("content", "/etc/passwd")}),
    "chmod": (MULTI, 0, lambda d: os.chmod(d / "etc/secret", 0o644), {("mode", "/etc/secret")}),
    "chown": (MULTI, 0, lambda d: os.lchown(d / "data/x", 5, 5), {("owner", "/data/x")}),
    "add-file": (MULTI, 2, lambda d: (d / "data/new").write_text("x"), {("extra", "/data/new")}),
    "remove-whiteout": (MULTI, 1, lambda d: (d / "del/gone").unlink(), {("whiteout", "/del/gone")}),
    "remove-opaque": (
        MULTI,
        1,
        lambda d: os.removexattr(d / "opq", "trusted.overlay.opaque"),
        {("opaque", "/opq")},
    ),
    "add-opaque": (
        MULTI,
        2,
        lambda d: os.setxattr(d / "data", "trusted.overlay.opaque", b"y"),
        {("opaque", "/data")},
    ),
    "break-hardlink": (MULTI, 0, lambda d: _break_link(d / "data/b"), {("hardlink", "/data/b")}),
    "retarget-symlink": (MULTI, 1, lambda d: _relink(d / "link", "/etc"), {("symlink", "/link")}),
    "change-xattr": (
        MULTI,
        0,
        lambda d: os.setxattr(d / "data/x", "user.note", b"bye"),
        {("xattr", "/data/x")},
    ),
    "delete-dir": (MULTI, 0, lambda d: shutil.rmtree(d / "opq"), {("missing", "/opq")}),
    "replace-device": (
        MULTI,
        0,
        lambda d: _replace_dev(d / "devs/null"),
        {("device", "/devs/null")},
    ),
    "type-change": (MULTI, 0, lambda d: _to_dir(d / "del/keep"), {("type", "/del/keep")}),
    "zstd-layer-content": (
        MULTI,
        2,
        lambda d: (d / "data/zst").write_bytes(b"changed"),
        {("content", "/data/zst")},
    ),
    "uncompressed-layer-content": (
        MULTI,
        1,
        lambda d: _flip_byte(d / "usr/share/big", 700_000),
        {("content", "/usr/share/big")},
    ),
}


def _append(path: Path) -> None:
    with open(path, "a") as f:
        f.write("intruder:x:0:0::/:/bin/sh\n")


def _break_link(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)


def _relink(path: Path, target: str) -> None:
    path.unlink()
    path.symlink_to(target)


def _replace_dev(path: Path) -> None:
    path.unlink()
    os.mknod(path, 0o20666, os.makedev(1, 5))
    os.chmod(path, 0o666)


def _to_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _flip_byte(path: Path, offset: int) -> None:
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damage_is_reported_exactly(ctrd: CtrdEnv, root: Path, name: str) -> None:
    image, index, damage, expected = DAMAGE[name]
    snap = layer_dir(ctrd, root, "default", image, index)
    damage(snap)
    code, found, _ = verify_all(root)
    assert code == 1
    assert found == {("default", image, index, str(snap), kind, path) for kind, path in expected}


def test_removed_snapshot_dir(ctrd: CtrdEnv, root: Path) -> None:
    fs = layer_dir(ctrd, root, "k8s.io", PAUSE, 0)
    shutil.rmtree(fs.parent)
    code, found, _ = verify_all(root)
    assert code == 1
    assert found == {("k8s.io", PAUSE, 0, str(fs), "snapshot", None)}
    res = run_cli("containerd", "check", "--root", str(root), "--json")
    assert res.code == 1
    kinds = [(f["kind"], str(fs.parent) in f["detail"]) for f in res.json()["findings"]]
    assert kinds == [("record-without-directory", True)]
    listing = run_cli("containerd", "images", "--root", str(root), "-n", "k8s.io")
    assert f"{fs}  MISSING" in listing.out


def test_check_reports_orphan_dir_and_bad_blobs(ctrd: CtrdEnv, root: Path) -> None:
    snapdir = root / "io.containerd.snapshotter.v1.overlayfs/snapshots"
    (snapdir / "999" / "fs").mkdir(parents=True)
    blobs = root / "io.containerd.content.v1.content/blobs/sha256"
    pause_blob = ctrd.info[("default", PAUSE)]["layers"][0].split(":")[1]
    zstd_blob = ctrd.info[("default", MULTI)]["layers"][2].split(":")[1]
    with open(blobs / pause_blob, "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    (blobs / zstd_blob).unlink()
    res = run_cli("containerd", "check", "--root", str(root), "--json")
    assert res.code == 1
    got = sorted((f["kind"], f["detail"].split(" ")[0]) for f in res.json()["findings"])
    assert got == sorted(
        [
            ("directory-without-record", f"{snapdir / '999'}:"),
            ("blob-digest", f"sha256:{pause_blob}"),
            ("blob-missing", f"sha256:{zstd_blob}"),
        ]
    )
    # verify sees the same: both pause snapshots' blob fails, the zstd layer's blob is gone.
    code, found, _ = verify_all(root)
    assert code == 1
    assert found == {
        ("default", PAUSE, 0, str(layer_dir(ctrd, root, "default", PAUSE, 0)), "digest", None),
        ("k8s.io", PAUSE, 0, str(layer_dir(ctrd, root, "k8s.io", PAUSE, 0)), "digest", None),
        ("default", MULTI, 2, str(layer_dir(ctrd, root, "default", MULTI, 2)), "blob", None),
    }


def test_commands_change_nothing(ctrd: CtrdEnv, tmp_path: Path) -> None:
    root = ctrd.copy_with_stale_atimes(tmp_path / "root")
    (layer_dir(ctrd, root, "k8s.io", PAUSE, 0) / "pause").unlink()  # so verify reads a lot
    before = fingerprint(root)
    for args in (
        ["images"],
        ["images", "--json"],
        ["snapshots"],
        ["verify", "--all"],
        ["verify", "--all", "--json"],
        ["check"],
        ["mount", "--print-lowerdir", "docker.io/test/multi:1", str(tmp_path)],
    ):
        res = run_cli("containerd", *args, "--root", str(root))
        assert res.code in (0, 1), (args, res.err)
    assert fingerprint(root) == before


def test_reads_live_root_while_containerd_runs(ctrd: CtrdEnv) -> None:
    """containerd holds its flock: we must still read, and find everything clean."""
    res = run_cli("containerd", "verify", "--all", "--root", ctrd.daemon.root)
    assert res.code == 0, res.out
    res = run_cli("containerd", "check", "--root", ctrd.daemon.root)
    assert res.code == 0, res.out


def test_bad_root_is_one_line_error(tmp_path: Path) -> None:
    res = run_cli_process("containerd", "images", "--root", str(tmp_path / "nope"))
    assert res.code == 1 and res.err.count("\n") == 1 and "no such directory" in res.err
    (tmp_path / "io.containerd.metadata.v1.bolt").mkdir()
    (tmp_path / "io.containerd.metadata.v1.bolt/meta.db").write_bytes(b"garbage" * 1000)
    res = run_cli_process("containerd", "verify", "--all", "--root", str(tmp_path))
    assert res.code == 1 and res.err.count("\n") == 1 and "not a bbolt" in res.err


def test_cp_is_faithful(ctrd: CtrdEnv, root: Path) -> None:
    """Guard for the other tests: the copy keeps xattrs, devices and hard links."""
    base = layer_dir(ctrd, root, "default", MULTI, 0)
    assert os.stat(base / "data/a").st_ino == os.stat(base / "data/b").st_ino
    assert os.getxattr(base / "data/x", "user.note") == b"hello"
    out = subprocess.run(
        ["stat", "-c", "%F %t:%T", str(base / "devs/null")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "character special file 1:3"


def test_symlinked_snapshot_dir_is_not_followed(ctrd: CtrdEnv, root: Path, tmp_path: Path) -> None:
    """A snapshot dir replaced by a symlink to a perfect copy elsewhere is still damage."""
    fs = layer_dir(ctrd, root, "k8s.io", PAUSE, 0)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(fs, elsewhere, symlinks=True)
    shutil.rmtree(fs)
    fs.symlink_to(elsewhere)
    code, found, _ = verify_all(root)
    assert code == 1
    assert found == {("k8s.io", PAUSE, 0, str(fs), "snapshot", None)}
    res = run_cli(
        "containerd", "mount", "-n", "k8s.io", "pause:3.9", str(tmp_path), "--root", str(root)
    )
    assert res.code == 1 and "missing or not a directory" in res.err
