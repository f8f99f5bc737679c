"""Mounting and unmounting the benchmark targets, and nothing left behind.

Every mount made here is recorded by mount point and every daemon by its Popen (so by
pid); ``unmount_all`` runs at exit and from the runner's ``finally``. FUSE daemons run in
the foreground as our children, so we know their pid for RSS and can end exactly them.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import time
from dataclasses import dataclass

TARGETS = ("kernel", "fuse-overlayfs", "pyoverlay", "plain")
FUSE_TARGETS = ("fuse-overlayfs", "pyoverlay")
KERNEL_PINNED = "redirect_dir=off,index=off,metacopy=off,xino=off"
MOUNT_TIMEOUT = 30.0
EXIT_TIMEOUT = 10.0


class MountError(Exception):
    """A target could not be mounted; the message is one line."""


@dataclass
class Layers:
    """Where one session's overlay lives."""

    lowers: list[str]  # top first, as lowerdir= lists them
    upper: str
    work: str
    merged: str


class Mount:
    """A live target: ``root`` is where workloads run."""

    def __init__(self, target: str, root: str, *, mounted: bool, proc=None, log=None) -> None:
        self.target = target
        self.root = root
        self.mounted = mounted
        self.proc: subprocess.Popen | None = proc
        self.log_path = log
        if mounted:
            _ACTIVE[root] = self

    @property
    def daemon_pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def abort(self) -> None:
        """Unstick a hung mount: kill our daemon (FUSE then fails pending requests)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        if self.mounted:
            lazy = ["fusermount3", "-u", "-z"] if self.proc else ["umount", "-l"]
            subprocess.run([*lazy, self.root], capture_output=True, check=False)

    def unmount(self) -> None:
        """Unmount by mount point and end our daemon by pid; safe to call twice."""
        try:
            if self.mounted and is_mounted(self.root):
                _unmount_path(self.root, fuse=self.proc is not None)
        finally:
            self.mounted = False
            _ACTIVE.pop(self.root, None)
            self._reap()

    def _reap(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.proc.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_ACTIVE: dict[str, Mount] = {}


def unmount_all() -> None:
    """Tear down whatever is still mounted (called from finally and at exit)."""
    for mount in list(_ACTIVE.values()):
        try:
            mount.unmount()
        except Exception as exc:  # keep tearing the others down
            print(f"bench: could not unmount {mount.root}: {exc}")


atexit.register(unmount_all)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_table() -> list[tuple[str, str, str]]:
    """(mount point, fs type, source) for each line of /proc/self/mountinfo."""
    rows = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            rows.append((_unescape(fields[4]), rest[0], rest[1] if len(rest) > 1 else ""))
    return rows


def is_mounted(path: str) -> bool:
    path = os.path.realpath(path)
    return any(mp == path for mp, _, _ in mount_table())


def _unmount_path(path: str, *, fuse: bool) -> None:
    cmd = ["fusermount3", "-u", path] if fuse else ["umount", path]
    for attempt in range(20):
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode == 0 or not is_mounted(path):
            return
        time.sleep(0.05 * (attempt + 1))  # busy: a child of ours may still be exiting
    lazy = ["fusermount3", "-u", "-z", path] if fuse else ["umount", "-l", path]
    subprocess.run(lazy, capture_output=True, check=False)


def mount_plain(root: str) -> Mount:
    return Mount("plain", root, mounted=False)


def mount_kernel(layers: Layers) -> Mount:
    opts = (
        f"lowerdir={':'.join(layers.lowers)},upperdir={layers.upper},"
        f"workdir={layers.work},{KERNEL_PINNED}"
    )
    res = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, layers.merged],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        raise MountError(f"kernel overlayfs: {_last_line(res.stderr)}")
    return Mount("kernel", layers.merged, mounted=True)


def mount_fuse_overlayfs(layers: Layers, log_path: str) -> Mount:
    opts = f"lowerdir={':'.join(layers.lowers)},upperdir={layers.upper},workdir={layers.work}"
    cmd = ["fuse-overlayfs", "-f", "-o", opts, layers.merged]
    return _start_daemon("fuse-overlayfs", cmd, layers.merged, log_path, env=None)


def mount_pyoverlay(layers: Layers, log_path: str, python: str, repo: str) -> Mount:
    cmd = [
        python,
        "-m",
        "pyoverlay",
        "mount",
        "-f",
        ":".join(layers.lowers),
        layers.upper,
        layers.work,
        layers.merged,
    ]
    env = dict(os.environ)
    # Run the tree's own package even when the venv has no editable install of it.
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    return _start_daemon("pyoverlay", cmd, layers.merged, log_path, env=env)


def _start_daemon(target: str, cmd: list[str], mountpoint: str, log_path: str, env) -> Mount:
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd="/"
        )
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while time.monotonic() < deadline:
        if is_mounted(mountpoint):
            return Mount(target, mountpoint, mounted=True, proc=proc, log=log_path)
        if proc.poll() is not None:
            raise MountError(f"{target} exited with {proc.returncode}: {_log_tail(log_path)}")
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    if is_mounted(mountpoint):
        _unmount_path(mountpoint, fuse=True)
    raise MountError(f"{target} did not mount within {MOUNT_TIMEOUT:.0f} s: {_log_tail(log_path)}")


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no message)"


def _log_tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return _last_line(f.read()[-4000:])
    except OSError:
        return "(no log)"


def mount_target(target: str, layers: Layers, *, plain_root: str, python: str, repo: str) -> Mount:
    """Mount one target over ``layers`` (plain ignores them and uses ``plain_root``)."""
    log_path = os.path.join(os.path.dirname(layers.merged), f"{target}.log")
    if target == "plain":
        return mount_plain(plain_root)
    if target == "kernel":
        return mount_kernel(layers)
    if target == "fuse-overlayfs":
        return mount_fuse_overlayfs(layers, log_path)
    if target == "pyoverlay":
        return mount_pyoverlay(layers, log_path, python, repo)
    raise MountError(f"unknown target {target!r}")
