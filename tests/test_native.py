"""The C helper against the Python reference: identical answers, no fd or memory leaks.

A hypothesis property builds random layer sets (every whiteout and opaque format,
redirects, symlinks, files and directories fighting over one name across layers), then
resolves and lists every path through both implementations and requires the same
Resolved, the same listing and the same exception. Also: the fd count after 100,000
lookups, Python memory after many lookups, and the choice of implementation.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyoverlay import namei, native, readdir
from pyoverlay.layers import LayerStack

needs_native = pytest.mark.skipif(not native.available(), reason="pyoverlay._native not built")
pytestmark = needs_native

TOP_NAMES = ("a", "b", "c", "d")
SUB_NAMES = ("x", "y", "z")
#: What one name can be in one layer.
LEAF_KINDS = (
    "absent",
    "file",
    "empty",
    "chr_whiteout",
    "xattr_whiteout",
    "user_xattr_whiteout",
    "wh_file",
    "fifo",
    "null_dev",
    "link_sibling",
    "link_abs",
    "link_dotdot",
)
DIR_KINDS = ("dir", "dir_and_wh")
#: Markers a directory copy can carry.
MARKERS = (
    "none",
    "none",
    "trusted_y",
    "user_y",
    "fuseoverlayfs_y",
    "trusted_x",
    "user_x",
    "fuseoverlayfs_x",
    "opq_file",
    "trusted_other",
    "redirect_rel",
    "redirect_abs",
    "redirect_escape",
)
EXTRA_NAMES = (b"zz", b".", b"..", b"", b".wh.a", b"a/x", b"x" * 300)

leaf = st.sampled_from(LEAF_KINDS)
dir_spec = st.tuples(st.sampled_from(MARKERS), st.fixed_dictionaries({n: leaf for n in SUB_NAMES}))
entry = st.one_of(leaf, st.tuples(st.sampled_from(DIR_KINDS), dir_spec))
layer_spec = st.tuples(
    st.sampled_from(MARKERS[:9]), st.fixed_dictionaries({n: entry for n in TOP_NAMES})
)


# -- building layers -------------------------------------------------------------------


def _set_markers(path: str, marker: str) -> None:
    values = {
        "trusted_y": ("trusted.overlay.opaque", b"y"),
        "user_y": ("user.overlay.opaque", b"y"),
        "fuseoverlayfs_y": ("user.fuseoverlayfs.opaque", b"y"),
        "trusted_x": ("trusted.overlay.opaque", b"x"),
        "user_x": ("user.overlay.opaque", b"x"),
        "fuseoverlayfs_x": ("user.fuseoverlayfs.opaque", b"x"),
        "trusted_other": ("trusted.overlay.opaque", b"yes"),
        "redirect_rel": ("trusted.overlay.redirect", b"b"),
        "redirect_abs": ("user.overlay.redirect", b"/c"),
        "redirect_escape": ("trusted.overlay.redirect", b"/../../outside"),
    }
    if marker == "opq_file":
        Path(path, ".wh..wh..opq").touch()
    elif marker in values:
        os.setxattr(path, *values[marker])


def _make_leaf(parent: str, name: str, kind: str) -> None:
    path = os.path.join(parent, name)
    if kind in ("file", "empty"):
        Path(path).write_bytes(b"data\n" if kind == "file" else b"")
    elif kind == "chr_whiteout":
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    elif kind in ("xattr_whiteout", "user_xattr_whiteout"):
        Path(path).write_bytes(b"")
        ns = "trusted" if kind == "xattr_whiteout" else "user"
        os.setxattr(path, f"{ns}.overlay.whiteout", b"y")
    elif kind == "wh_file":
        Path(parent, ".wh." + name).touch()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "null_dev":
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    elif kind == "link_sibling":
        os.symlink("b", path)
    elif kind == "link_abs":
        os.symlink("/etc", path)
    elif kind == "link_dotdot":
        os.symlink("../../..", path)


def _make_entry(parent: str, name: str, spec: Any) -> None:
    if isinstance(spec, str):
        _make_leaf(parent, name, spec)
        return
    kind, (marker, children) = spec
    path = os.path.join(parent, name)
    os.mkdir(path)
    for child, child_kind in children.items():
        _make_leaf(path, child, child_kind)
    _set_markers(path, marker)
    if kind == "dir_and_wh":
        Path(parent, ".wh." + name).touch()


def build_layers(root: str, specs: list[Any]) -> list[str]:
    """One directory per spec under ``root``, topmost first; returns their paths."""
    os.makedirs(os.path.join(root, "outside", "b"))
    Path(root, "outside", "SECRET").write_text("outside\n")
    paths = []
    for i, (root_marker, entries) in enumerate(specs):
        layer = os.path.join(root, "layers", f"l{i}")
        os.makedirs(layer)
        for name, spec in entries.items():
            _make_entry(layer, name, spec)
        _set_markers(layer, root_marker)
        paths.append(layer)
    return paths


# -- running both implementations ------------------------------------------------------


@contextlib.contextmanager
def implementation(active: bool) -> Iterator[None]:
    old = native.set_active(active)
    try:
        yield
    finally:
        native.set_active(old)


def outcome(func: Callable[[], Any]) -> Any:
    """The value of ``func()``, or its exception as comparable data."""
    try:
        return ("ok", func())
    except Exception as exc:
        return ("raised", type(exc).__name__, getattr(exc, "errno", None))


def walk_both(stack: LayerStack) -> list[str]:
    """Resolve and list every path both ways; the differences, described."""
    diffs: list[str] = []
    pending: list[tuple[namei.Resolved, namei.Resolved]] = []
    roots = (namei.root(stack), namei.root(stack))
    assert roots[0] == roots[1]
    pending.append(roots)
    while pending:
        ref_dir, nat_dir = pending.pop()
        with implementation(False):
            ref_names = outcome(lambda d=ref_dir: readdir.merged_names(stack, d))
        with implementation(True):
            nat_names = outcome(lambda d=nat_dir: readdir.merged_names(stack, d))
        if ref_names != nat_names:
            diffs.append(f"listing {ref_dir.path!r}: {ref_names} != {nat_names}")
        names = set(ref_names[1]) if ref_names[0] == "ok" else set()
        names |= {n.encode() for n in TOP_NAMES + SUB_NAMES} | set(EXTRA_NAMES)
        for name in sorted(names):
            with implementation(False):
                ref = outcome(lambda n=name, d=ref_dir: namei.lookup_child(stack, d, n))
            with implementation(True):
                nat = outcome(lambda n=name, d=nat_dir: namei.lookup_child(stack, d, n))
            if ref != nat:
                diffs.append(f"lookup {ref_dir.path!r} / {name!r}: {ref} != {nat}")
            elif ref[0] == "ok" and ref[1] is not None and ref[1].is_dir:
                pending.append((ref[1], nat[1]))
    return diffs


@settings(
    max_examples=int(os.environ.get("PYOVERLAY_TEST_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(specs=st.lists(layer_spec, min_size=1, max_size=4), cache_size=st.sampled_from([16, 512]))
def test_native_and_python_agree(specs: list[Any], cache_size: int) -> None:
    with tempfile.TemporaryDirectory(prefix="pyoverlay-native-") as root:
        paths = build_layers(root, specs)
        stack = LayerStack(paths[1:], paths[0], cache_size=cache_size)
        try:
            assert walk_both(stack) == []
        finally:
            stack.close()


def test_property_covers_the_interesting_cases(tmp_path: Path) -> None:
    """A fixed set where the two paths must agree and the answers are known."""
    hidden_x = ("dir", ("trusted_x", {"x": "xattr_whiteout", "y": "file", "z": "absent"}))
    plain = ("dir", ("none", {"x": "file", "y": "file", "z": "file"}))
    specs = [("none", {"a": hidden_x}), ("none", {"a": plain, "b": "file"})]
    stack = LayerStack(build_layers(str(tmp_path), specs), None)
    try:
        assert walk_both(stack) == []
        top = namei.lookup_child(stack, namei.root(stack), b"a")
        assert top is not None and top.is_merged and top.markers[0].xattr_whiteouts
        assert namei.lookup_child(stack, top, b"x") is None  # hidden by the xattr whiteout
        assert namei.lookup_child(stack, top, b"z").top[0].index == 1
        # the C helper answered these itself rather than handing them to the reference
        assert native.lookup_child(stack, top, b"z") is not native.DECLINED
        assert native.merged_names(stack, top) == [b"y", b"z"]
    finally:
        stack.close()


# -- the low-level primitive ------------------------------------------------------------


def test_low_level_lookup(tmp_path: Path) -> None:
    from pyoverlay import _native

    top, bottom = tmp_path / "top", tmp_path / "bottom"
    for layer in (top, bottom):
        (layer / "d").mkdir(parents=True)
    (bottom / "f").write_text("x")
    os.mknod(top / "gone", stat.S_IFCHR, os.makedev(0, 0))
    (bottom / "gone").write_text("hidden")
    os.setxattr(top / "d", "trusted.overlay.opaque", b"y")
    fds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in (top, bottom)]
    try:
        assert _native.lookup(b"nothing", fds, [False, False]) is None
        assert _native.lookup(b"gone", fds, [False, False]) is None
        is_dir, hits, markers, st_tuple = _native.lookup(b"f", fds, [False, False])
        assert (is_dir, hits, markers) == (False, (1,), ())
        assert st_tuple[1] == os.stat(bottom / "f").st_ino
        is_dir, hits, markers, _ = _native.lookup(b"d", fds, [False, False])
        assert (is_dir, hits, markers) == (True, (0,), (_native.OPAQUE,))
        assert _native.lookup(b"d", [None, fds[1]], [False, False])[1] == (1,)
        assert _native.lookup(b"..", fds, [False, False]) is NotImplemented
        assert _native.lookup(b"a/b", fds, [False, False]) is NotImplemented
    finally:
        for fd in fds:
            os.close(fd)


# -- leaks ----------------------------------------------------------------------------


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _mixed_layers(tmp_path: Path) -> list[str]:
    opaque = ("dir", ("user_y", {"x": "file", "y": "absent", "z": "wh_file"}))
    plain = ("dir", ("none", {"x": "file", "y": "file", "z": "file"}))
    xdir = ("dir", ("trusted_x", {"x": "xattr_whiteout", "y": "file", "z": "fifo"}))
    specs = [
        ("trusted_x", {"a": "chr_whiteout", "b": opaque}),
        ("none", {"a": "file", "b": plain, "c": "link_abs"}),
        ("none", {"c": "file", "d": xdir}),
    ]
    return build_layers(str(tmp_path), specs)


def test_no_fd_leak_after_100000_lookups(tmp_path: Path) -> None:
    paths = _mixed_layers(tmp_path)
    stack = LayerStack(paths[1:], paths[0], cache_size=16)
    names = [b"a", b"b", b"c", b"d", b"nope", b"x", b"y", b"z"]
    try:
        root = namei.root(stack)
        dirs = [root, *(namei.lookup_child(stack, root, n) for n in (b"b", b"d"))]
        for d in dirs:  # warm the stack's fd cache
            for n in names:
                namei.lookup_child(stack, d, n)
        before = _fd_count()
        for i in range(100_000):
            namei.lookup_child(stack, dirs[i % 3], names[i % len(names)])
        assert _fd_count() == before
        assert native.ACTIVE
    finally:
        stack.close()


def test_no_fd_leak_in_merged_listings(tmp_path: Path) -> None:
    paths = _mixed_layers(tmp_path)
    stack = LayerStack(paths[1:], paths[0])
    try:
        root = namei.root(stack)
        readdir.merged_names(stack, root)
        before = _fd_count()
        for _ in range(5000):
            readdir.merged_names(stack, root)
        assert _fd_count() == before
    finally:
        stack.close()


def test_no_python_memory_growth(tmp_path: Path) -> None:
    """A leaked reference in the C code shows up as memory that only grows."""
    paths = _mixed_layers(tmp_path)
    stack = LayerStack(paths[1:], paths[0])
    names = [b"a", b"b", b"c", b"d", b"nope"]
    try:
        root = namei.root(stack)
        sub = namei.lookup_child(stack, root, b"b")

        def work(rounds: int) -> None:
            for _ in range(rounds):
                for n in names:
                    namei.lookup_child(stack, root, n)
                    namei.lookup_child(stack, sub, n)
                readdir.merged_names(stack, root)

        work(200)
        tracemalloc.start()
        try:
            work(200)
            first, _ = tracemalloc.get_traced_memory()
            work(4000)
            second, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # 4000 rounds leaking even one small object each would add well over 100 kB.
        assert second - first < 64 * 1024
    finally:
        stack.close()


# -- choosing the implementation ------------------------------------------------------


def _choice_in_subprocess(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop("PYOVERLAY_NATIVE", None)
    if env_value is not None:
        env["PYOVERLAY_NATIVE"] = env_value
    code = (
        "import sys; from pyoverlay import native, namei;"
        "print(native.implementation(), 'pyoverlay._native' in sys.modules)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_native_is_the_default() -> None:
    assert _choice_in_subprocess(None) == "native True"


@pytest.mark.parametrize("value", ["0", "off", "no"])
def test_env_forces_python(value: str) -> None:
    assert _choice_in_subprocess(value) == "python False"


def test_set_active_round_trip() -> None:
    old = native.set_active(False)
    try:
        assert native.implementation() == "python"
    finally:
        native.set_active(old)
    assert native.implementation() == "native"


# -- sanitizers -----------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
SANITIZED_TESTS = "covers or low_level or agree or listings"
_SANITIZER_PATTERNS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")


#: Drop the editable install's import hook so PYTHONPATH's sanitized copy is imported.
_NO_EDITABLE = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path"
    " if not getattr(f, '__module__', '').startswith('__editable__')];"
)


def _gcc_file(name: str) -> str:
    res = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True)
    return res.stdout.strip()


def _build_sanitized(dest: Path) -> Path:
    """pyoverlay with _native built under ASan + UBSan (and -Werror) in ``dest``."""
    import sysconfig

    pkg = dest / "pyoverlay"
    subprocess.run(["cp", "-r", str(REPO / "pyoverlay"), str(pkg)], check=True, capture_output=True)
    for old in pkg.glob("_native*.so"):
        old.unlink()
    out = pkg / ("_native" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [
        "gcc", "-shared", "-fPIC", "-g", "-O1", "-std=gnu11", "-Wall", "-Wextra", "-Werror",
        "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
        f"-I{sysconfig.get_paths()['include']}", str(REPO / "native" / "lookup.c"), "-o", str(out),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return out


def _our_reports(log_text: str) -> list[str]:
    """Sanitizer reports; a leak counts only when our code allocated it (Python leaks
    some objects at exit by design)."""
    reports = [block for block in log_text.split("\n\n") if block.strip()]
    found = []
    for block in reports:
        if "Direct leak" in block or "Indirect leak" in block:
            if "lookup.c" in block or "ovl_fs.h" in block:
                found.append(block)
        elif any(p in block for p in _SANITIZER_PATTERNS[:2]):
            found.append(block)
    return found


@pytest.mark.timeout(900)
@pytest.mark.skipif(bool(os.environ.get("PYOVERLAY_IN_SANITIZER")), reason="already inside")
def test_lookup_tests_clean_under_asan_and_ubsan(tmp_path: Path) -> None:
    libasan = _gcc_file("libasan.so")
    if not os.path.exists(libasan):
        pytest.fail("libasan is missing: install gcc's sanitizer runtime")
    built = _build_sanitized(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(tmp_path),
        LD_PRELOAD=libasan,
        PYTHONMALLOC="malloc",  # every object through malloc, where ASan watches it
        ASAN_OPTIONS=f"detect_leaks=1:log_path={logs}/asan:abort_on_error=0",
        UBSAN_OPTIONS=f"print_stacktrace=1:halt_on_error=1:log_path={logs}/ubsan",
        PYOVERLAY_TEST_EXAMPLES="25",
        PYOVERLAY_IN_SANITIZER="1",
    )
    env.pop("PYOVERLAY_NATIVE", None)
    which = subprocess.run(
        [sys.executable, "-c", _NO_EDITABLE + "import pyoverlay._native as n; print(n.__file__)"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert which.stdout.strip() == str(built), which.stderr
    res = subprocess.run(
        [sys.executable, "-c", _NO_EDITABLE + "import pytest; sys.exit(pytest.main(sys.argv[1:]))",
         "-q", "-p", "no:cacheprovider", "-k", SANITIZED_TESTS,
         str(REPO / "tests" / "test_native.py")],
        env=env, capture_output=True, text=True, timeout=840, cwd=tmp_path,
    )  # fmt: skip
    log_text = "\n\n".join(p.read_text(errors="replace") for p in sorted(logs.iterdir()))
    assert _our_reports(log_text) == []
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " passed" in res.stdout
