"""The live daemon: our reading of meta.db matches what containerd itself reports."""

from __future__ import annotations

import pytest
from conftest import MULTI, PAUSE, CtrdEnv, run_cli

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
