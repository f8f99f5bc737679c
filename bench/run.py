"""The benchmark command: build the fixture, mount each target, run the workloads, report.

    /tmp/venv/bin/python bench/run.py                       # full run, 5 runs, all targets
    /tmp/venv/bin/python bench/run.py --quick --targets kernel,fuse-overlayfs,plain

Needs root (mounts, drop_caches). Works under a fresh temp dir, never under /mnt, and
unmounts everything it mounted on the way out, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

import fixtures  # noqa: E402
import mounts  # noqa: E402
import report  # noqa: E402
import workloads  # noqa: E402

FULL_TIMEOUT_S = 900.0
QUICK_TIMEOUT_S = 120.0


class BenchError(Exception):
    """Bad input or an unusable machine: reported as one line, exit status 2."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--targets", default=",".join(mounts.TARGETS), help="comma-separated")
    p.add_argument("--workloads", default="all", help="comma-separated names, or all")
    p.add_argument("--quick", action="store_true", help="small sizes: seconds, not minutes")
    p.add_argument("--runs", type=int, default=None, help="runs per workload (default 5)")
    p.add_argument("--workdir", help="where fixtures and mounts go (kept for reuse)")
    p.add_argument("--out", help="report directory (default bench/results/<timestamp>)")
    p.add_argument("--python", default=sys.executable, help="Python that runs pyoverlay")
    p.add_argument("--timeout", type=float, help="seconds before one measurement is aborted")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    p.add_argument("--no-install", action="store_true", help="never pip-install matplotlib")
    p.add_argument("--keep", action="store_true", help="keep the temp workdir")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    return p.parse_args(argv)


def _split(text: str, known: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise BenchError(f"unknown {what} {', '.join(unknown) or '(none)'}; known: {known}")
    return names


def check_args(args: argparse.Namespace) -> None:
    if args.runs is not None and args.runs < 1:
        raise BenchError("--runs must be at least 1")
    if os.geteuid() != 0:
        raise BenchError("must run as root (it mounts overlays and drops caches)")
    for tool in ("fusermount3", "tar", "mount", "umount", "cp"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found on PATH")
    if args.workdir:
        real = os.path.realpath(args.workdir)
        if real == "/mnt" or real.startswith("/mnt/"):
            raise BenchError(f"--workdir {args.workdir} is under /mnt; choose another place")
        if os.path.exists(real) and not os.path.isdir(real):
            raise BenchError(f"--workdir {args.workdir} exists and is not a directory")


# --- one measurement ---------------------------------------------------------------------


class Watchdog:
    """Aborts a mount whose measurement hangs, so the harness can go on and tear down."""

    def __init__(self, seconds: float, mount: mounts.Mount, what: str) -> None:
        self.timer = threading.Timer(seconds, self._fire)
        self.mount, self.what, self.seconds, self.fired = mount, what, seconds, False

    def _fire(self) -> None:
        self.fired = True
        print(f"bench: {self.what} exceeded {self.seconds:.3g} s; aborting the mount")
        self.mount.abort()

    def __enter__(self) -> Watchdog:
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()


class Runner:
    """Holds the per-invocation settings and runs measurements."""

    def __init__(self, args: argparse.Namespace, workdir: str, fx: fixtures.Fixture) -> None:
        self.args, self.workdir, self.fx = args, workdir, fx
        self.timeout = args.timeout or (QUICK_TIMEOUT_S if args.quick else FULL_TIMEOUT_S)
        self.sessions = os.path.join(workdir, "sessions")
        self.counter = 0

    def _new_layers(self, stack: str) -> mounts.Layers:
        self.counter += 1
        base = os.path.join(self.sessions, f"{self.counter:05d}")
        os.makedirs(base)
        lowers, upper_template = self.fx.stack(stack)
        upper = os.path.join(base, "upper")
        if upper_template:
            # cp -a keeps whiteouts (char 0/0) and trusted.overlay.* xattrs.
            subprocess.run(["cp", "-a", upper_template, upper], check=True)
        else:
            os.mkdir(upper)
        for name in ("work", "merged"):
            os.mkdir(os.path.join(base, name))
        return mounts.Layers(lowers, upper, os.path.join(base, "work"), f"{base}/merged")

    def mount(self, target: str, stack: str) -> tuple[mounts.Mount, str | None]:
        base = None if target == "plain" else self._new_layers(stack)
        layers = base or mounts.Layers([], "", "", os.path.join(self.sessions, "plain"))
        try:
            m = mounts.mount_target(
                target, layers, plain_root=self.fx.plain, python=self.args.python, repo=REPO
            )
        except BaseException:
            if base:
                shutil.rmtree(os.path.dirname(base.merged), ignore_errors=True)
            raise
        return m, (os.path.dirname(base.merged) if base else None)

    def measure(self, target: str, wl: workloads.Workload) -> dict:
        mount, session = self.mount(target, wl.stack)
        ctx = workloads.Context(mount.root, self.fx, mount.daemon_pid)
        try:
            if wl.prepare:
                wl.prepare(ctx)
            os.sync()  # dirty data of earlier work must not be flushed inside our timing
            if wl.cold:
                workloads.drop_caches(3)
            with Watchdog(self.timeout, mount, f"{wl.name} on {target}"):
                return {"metrics": wl.run(ctx)}
        finally:
            try:
                if target == "plain" and wl.undo:
                    wl.undo(ctx)
            finally:
                mount.unmount()
                if session:
                    shutil.rmtree(session, ignore_errors=True)

    def probe(self, target: str) -> str | None:
        """Mount the main stack once; returns why the target is unusable, or None."""
        try:
            mount, session = self.mount(target, "main")
        except (mounts.MountError, OSError, subprocess.CalledProcessError) as exc:
            return _one_line(exc)
        try:
            if not os.path.isfile(os.path.join(mount.root, self.fx.big_file)):
                return "mounted, but the fixture's files are not visible in it"
            return None
        except OSError as exc:
            return f"mounted, but reading it failed: {_one_line(exc)}"
        finally:
            mount.unmount()
            if session:
                shutil.rmtree(session, ignore_errors=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


def label(wl: workloads.Workload, sizes: fixtures.Sizes, merged: object) -> str:
    """The workload's description with the sizes of this run filled in."""
    shown = f"{merged:,}" if isinstance(merged, int) else str(merged)
    return wl.label.format(**dataclasses.asdict(sizes), merged_entries=shown)


def _fmt(metrics: dict[str, float], kind: str) -> str:
    if kind == "time":
        return f"{metrics['seconds']:.4g} s"
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def run_all(runner: Runner, targets: list[str], names: list[str], runs: int) -> list[dict]:
    """Interleave workloads across targets; the target order rotates so none goes first."""
    out = []
    for run in range(runs):
        for wi, name in enumerate(names):
            wl = workloads.BY_NAME[name]
            eligible = [t for t in targets if t in wl.targets]
            shift = (run + wi) % max(1, len(eligible))
            for target in eligible[shift:] + eligible[:shift]:
                rec = {"run": run + 1, "workload": name, "target": target}
                try:
                    rec.update(runner.measure(target, wl))
                    shown = _fmt(rec["metrics"], wl.kind)
                except (OSError, RuntimeError, mounts.MountError, ValueError) as exc:
                    rec["error"] = _one_line(exc)
                    shown = "ERROR " + rec["error"]
                except subprocess.CalledProcessError as exc:
                    rec["error"] = _one_line(exc)
                    shown = "ERROR " + rec["error"]
                print(f"[run {run + 1}/{runs}] {name:<20} {target:<15} {shown}", flush=True)
                out.append(rec)
    return out


# --- main --------------------------------------------------------------------------------


def _sigterm(_signo, _frame) -> None:
    print("bench: terminated; tearing down mounts", file=sys.stderr)
    raise SystemExit(143)  # unwinds through the finally blocks that unmount


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        sizes = fixtures.QUICK if args.quick else fixtures.FULL
        for w in workloads.WORKLOADS:
            print(f"{w.name:<20} {w.kind:<8} {label(w, sizes, merged='N')}")
        return 0
    try:
        targets = _split(args.targets, mounts.TARGETS, "target")
        names = list(workloads.BY_NAME) if args.workloads == "all" else None
        names = names or _split(args.workloads, tuple(workloads.BY_NAME), "workload")
        check_args(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        return _run(args, targets, names)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; mounts were torn down", file=sys.stderr)
        return 130
    finally:
        mounts.unmount_all()


def _run(args: argparse.Namespace, targets: list[str], names: list[str]) -> int:
    sizes = fixtures.QUICK if args.quick else fixtures.FULL
    runs = args.runs or 5
    started = datetime.datetime.now(datetime.UTC)
    own_workdir = not args.workdir
    workdir = args.workdir or tempfile.mkdtemp(prefix="pyoverlay-bench-", dir=_tmp_base())
    os.makedirs(workdir, exist_ok=True)
    workdir = os.path.realpath(workdir)
    print(f"bench: workdir {workdir}")
    try:
        fx = fixtures.load_or_build(os.path.join(workdir, "fixture"), sizes)
        runner = Runner(args, workdir, fx)
        skipped = {}
        for t in targets:
            why = runner.probe(t)
            if why:
                print(f"bench: skipping {t}: {why}")
                skipped[t] = why
        live = [t for t in targets if t not in skipped]
        if not live:
            raise BenchError("no target could be mounted")
        measurements = run_all(runner, live, names, runs)
        results = _results(args, targets, names, runs, fx, skipped, measurements, started)
        results["machine"] = report.machine_info(workdir, REPO, args.python)
    finally:
        mounts.unmount_all()
        _cleanup(workdir, own_workdir and not args.keep)
    outdir = args.out or os.path.join(BENCH_DIR, "results", started.strftime("%Y%m%dT%H%M%SZ"))
    text = report.write_all(results, outdir, not args.no_chart, not args.no_install)
    print(text)
    print(f"bench: report in {outdir}")
    return 0


def _tmp_base() -> str:
    return "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()


def _cleanup(workdir: str, remove_all: bool) -> None:
    """Sessions always go; the fixture stays when the user chose the workdir (reuse)."""
    for mp, _, _ in mounts.mount_table():
        if mp == workdir or mp.startswith(workdir + "/"):
            print(f"bench: {mp} is still mounted; leaving {workdir} in place")
            return
    shutil.rmtree(os.path.join(workdir, "sessions"), ignore_errors=True)
    if remove_all:
        shutil.rmtree(workdir, ignore_errors=True)


def _results(args, targets, names, runs, fx, skipped, measurements, started) -> dict:
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "runs": runs,
        "targets": [t for t in targets if t not in skipped] + [t for t in skipped],
        "skipped": skipped,
        "workloads": names,
        "labels": {n: label(workloads.BY_NAME[n], fx.sizes, fx.merged_entries) for n in names},
        "kinds": {n: workloads.BY_NAME[n].kind for n in names},
        "sizes": dataclasses.asdict(fx.sizes),
        "fixture": {
            "merged_entries": fx.merged_entries,
            "rss_merged_entries": fx.rss_merged_entries,
        },
        "kernel_options": mounts.KERNEL_PINNED,
        "measurements": measurements,
        "elapsed_s": round(time.time() - started.timestamp(), 1),
    }


if __name__ == "__main__":
    sys.exit(main())
