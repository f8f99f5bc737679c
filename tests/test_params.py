"""Mount option parsing: kernel syntax, escapes, FUSE generic options, errors."""

import pytest

from pyoverlay.cli import main, mount_options_from_args
from pyoverlay.errors import UsageError
from pyoverlay.params import parse_lowerdir, parse_options


def test_lowerdir_escaped_colon() -> None:
    assert parse_lowerdir(r"/a\:b:/c:/d") == ["/a:b", "/c", "/d"]


def test_options_keep_escapes_until_lowerdir_is_split() -> None:
    opts = parse_options(r"lowerdir=/x\:y:/z,upperdir=/u,workdir=/w,userxattr,redirect_dir=on")
    assert opts.lowerdirs == ["/x:y", "/z"]
    assert (opts.upperdir, opts.workdir, opts.userxattr, opts.redirect_dir) == (
        "/u",
        "/w",
        True,
        True,
    )
    assert opts.xattr_prefix() == "user.overlay."


def test_generic_mount_options_are_accepted() -> None:
    opts = parse_options(
        "lowerdir=/l,rw,nodev,nosuid,noatime,allow_other,default_permissions,x-foo=1"
    )
    assert "allow_other" in opts.fuse_options
    assert opts.noatime


@pytest.mark.parametrize("bad", ["bogus", "redirect_dir=maybe", "cache=sometimes", "timeout=x"])
def test_unknown_or_bad_options_are_usage_errors(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_options(bad)


def test_empty_layer_is_refused() -> None:
    with pytest.raises(UsageError):
        parse_lowerdir("/a::/b")


def test_positional_forms() -> None:
    import argparse

    ns = argparse.Namespace(
        paths=["l1:l2", "u", "w", "m"], options=[], read_only=False, userxattr=False
    )
    opts, merged = mount_options_from_args(ns)
    assert (opts.lowerdirs, opts.upperdir, opts.workdir, merged) == (["l1", "l2"], "u", "w", "m")
    ns = argparse.Namespace(paths=["l1", "m"], options=[], read_only=True, userxattr=False)
    opts, merged = mount_options_from_args(ns)
    assert opts.read_only and opts.upperdir is None and merged == "m"
    # mount.fuse3 form: SOURCE MERGED -o OPTS
    ns = argparse.Namespace(
        paths=["src", "m"], options=["lowerdir=/a:/b,ro"], read_only=False, userxattr=False
    )
    opts, merged = mount_options_from_args(ns)
    assert opts.lowerdirs == ["/a", "/b"] and opts.read_only and merged == "m"


def test_cli_usage_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mount", "-o", "upperdir=/u", "/m"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pyoverlay: ")


@pytest.mark.parametrize(
    ("value", "creates"), [("on", True), ("off", False), ("follow", False), ("nofollow", False)]
)
def test_redirect_dir_values(value: str, creates: bool) -> None:
    assert parse_options(f"redirect_dir={value}").redirect_dir is creates
