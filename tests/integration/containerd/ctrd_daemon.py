"""Run Debian's real containerd privately for tests and the benchmark.

The daemon gets its own root, state, sockets and opt dir under a fresh temp dir and runs
in a private mount namespace; it and the tasks it started are stopped by pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time

DISABLED = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.devmapper",
]


class Containerd:
    """One private containerd daemon; ``start()``/``stop()`` may be called repeatedly."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.root = os.path.join(base, "root")
        self.state = os.path.join(base, "state")
        # Unix socket paths must stay short: keep them in their own small temp dir.
        self.sockdir = tempfile.mkdtemp(prefix="ctrd", dir="/tmp")
        self.sock = os.path.join(self.sockdir, "c.sock")
        self.config = os.path.join(base, "config.toml")
        self.proc: subprocess.Popen | None = None
        self.tasks: list[str] = []
        self._write_config()

    def _write_config(self) -> None:
        disabled = ", ".join(f'"{name}"' for name in DISABLED)
        with open(self.config, "w") as f:
            f.write(
                f'version = 2\nroot = "{self.root}"\nstate = "{self.state}"\n'
                f"disabled_plugins = [{disabled}]\n"
                f'[grpc]\n  address = "{self.sock}"\n'
                f'[ttrpc]\n  address = "{self.sock}.ttrpc"\n'
                f'[debug]\n  address = "{self.sock}.debug"\n'
                f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{self.base}/opt"\n'
            )

    def start(self, timeout: float = 20.0) -> None:
        log = open(os.path.join(self.base, "containerd.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "containerd", "--config", self.config],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited with {self.proc.returncode}; see {log.name}")
            ok = subprocess.run(
                ["ctr", "-a", self.sock, "version"], capture_output=True, timeout=10
            ).returncode
            if ok == 0:
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("containerd did not answer in time")

    def ctr(self, *args: str, namespace: str = "default", timeout: float = 60) -> str:
        cmd = ["ctr", "-a", self.sock, "-n", namespace, *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")
        return res.stdout

    def import_image(self, tar_path: str, namespace: str = "default") -> None:
        self.ctr("images", "import", "--snapshotter", "overlayfs", tar_path, namespace=namespace)

    def run(self, image: str, cid: str, *cmd: str, namespace: str = "default") -> int:
        """Start a container task in the background; returns its init pid."""
        self.tasks.append(f"{namespace}/{cid}")
        self.ctr("run", "-d", "--snapshotter", "overlayfs", image, cid, *cmd, namespace=namespace)
        out = self.ctr("task", "ls", namespace=namespace)
        for line in out.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == cid:
                return int(fields[1])
        raise RuntimeError(f"task {cid} not found")

    def kill_task(self, entry: str) -> None:
        namespace, cid = entry.split("/", 1)
        for args in (("task", "kill", "-s", "SIGKILL", cid), ("task", "rm", "-f", cid)):
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.ctr(*args, namespace=namespace, timeout=20)
            time.sleep(0.1)
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.ctr("containers", "rm", cid, namespace=namespace, timeout=20)

    def stop(self) -> None:
        """Kill the tasks we started, then stop containerd by pid."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for entry in self.tasks:
                self.kill_task(entry)
        self.tasks = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.sockdir, ignore_errors=True)
