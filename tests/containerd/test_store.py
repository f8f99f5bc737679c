"""The store on small synthetic roots (bbolt files from our test writer): odd records."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

from boltwriter import build

from pyoverlay.cli import main


def _blob(root: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    path = root / "io.containerd.content.v1.content/blobs/sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return "sha256:" + digest


def make_root(tmp_path: Path, manifest: dict) -> Path:
    root = tmp_path / "root"
    digest = _blob(root, json.dumps(manifest).encode())
    images = {b"docker.io/library/odd:1": {b"target": {b"digest": digest.encode()}}}
    meta = build({b"v1": {b"default": {b"images": images}}})
    (root / "io.containerd.metadata.v1.bolt").mkdir(parents=True)
    (root / "io.containerd.metadata.v1.bolt/meta.db").write_bytes(meta)
    return root


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_malformed_manifest_is_reported_not_a_crash(tmp_path: Path) -> None:
    root = make_root(tmp_path, {"schemaVersion": 2, "config": "oops", "layers": 7})
    code, out, err = run("containerd", "images", "--root", str(root), "--json")
    assert code == 0 and err == ""
    image = json.loads(out)["images"][0]
    assert image["name"] == "docker.io/library/odd:1" and "malformed" in image["error"]
    code, out, _ = run("containerd", "verify", "odd:1", "--root", str(root))
    assert code == 1 and "image: malformed manifest" in out
    code, _, err = run("containerd", "mount", "--print-lowerdir", "odd:1", "x", "--root", str(root))
    assert code == 1 and err.count("\n") == 1 and "odd:1" in err


def test_missing_config_blob_and_no_snapshotter_db(tmp_path: Path) -> None:
    config = "sha256:" + "0" * 64
    root = make_root(tmp_path, {"config": {"digest": config}, "layers": []})
    code, out, _ = run("containerd", "verify", "--all", "--root", str(root), "--json")
    assert code == 1
    findings = json.loads(out)["images"][0]["findings"]
    assert [f["kind"] for f in findings] == ["image"]
    assert config in findings[0]["detail"] and "missing" in findings[0]["detail"]
    code, out, _ = run("containerd", "snapshots", "--root", str(root), "--json")
    assert code == 0 and json.loads(out)["snapshots"] == []


def test_usage_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    for args in (
        ["containerd"],
        ["containerd", "verify", "x", "--all", "--root", str(tmp_path)],
        ["containerd", "images", "-n", "a", "-A"],
        ["containerd", "mount", "only-one-arg"],
    ):
        code, out, err = run(*args)
        assert (code, out) == (2, ""), args
        assert err.startswith("pyoverlay: ") and err.count("\n") == 1, (args, err)
