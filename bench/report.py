"""Turning measurements into the report: machine header, median tables, JSON and a chart.

Ratios are computed from medians of the same run, so they compare implementations on one
machine at one time; absolute seconds vary between machines and runs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

BASES = ("kernel", "fuse-overlayfs")


# --- machine -----------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    return 0.0


def _filesystem_of(path: str) -> str:
    from mounts import mount_table

    path = os.path.realpath(path)
    best = ("", "unknown", "")
    for mp, fstype, source in mount_table():
        inside = path == mp or path.startswith(mp.rstrip("/") + "/")
        if inside and len(mp) >= len(best[0]):
            best = (mp, fstype, source)
    return f"{best[1]} ({best[2]} on {best[0]})"


def _first_line(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not available"
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if "version" in ln.lower()]
    return "; ".join(lines[:3]) or "unknown"


def machine_info(workdir: str, repo: str, python: str) -> dict[str, str]:
    """The header of the report: enough to tell whether two runs are comparable."""
    git = subprocess.run(
        ["git", "-C", repo, "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "kernel": platform.release(),
        "os": _os_name(),
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": f"{_mem_total_gib():.1f} GiB",
        "workdir filesystem": _filesystem_of(workdir),
        "python (harness)": sys.version.split()[0],
        "python (pyoverlay)": python,
        "pyoverlay commit": git.stdout.strip() or "unknown",
        "fuse-overlayfs": _first_line(["fuse-overlayfs", "--version"]),
    }


def _os_name() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", "Linux")
    except OSError:
        return "Linux"


# --- numbers -----------------------------------------------------------------------------


def medians(measurements: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """workload -> target -> metric -> median over the runs that succeeded."""
    values: dict[str, dict[str, dict[str, list[float]]]] = {}
    for m in measurements:
        if "metrics" not in m:
            continue
        per_metric = values.setdefault(m["workload"], {}).setdefault(m["target"], {})
        for key, value in m["metrics"].items():
            per_metric.setdefault(key, []).append(value)
    return {
        w: {t: {k: statistics.median(v) for k, v in ms.items()} for t, ms in ts.items()}
        for w, ts in values.items()
    }


def _ratio_columns(targets: list[str]) -> list[tuple[str, str]]:
    cols = []
    for base in BASES:
        if base not in targets:
            continue
        for t in targets:
            if t != base and not (base == "fuse-overlayfs" and t == "kernel"):
                cols.append((t, base))
    return cols


def _cell(value: float | None) -> str:
    if value is None:
        return "—"
    if value == int(value) and abs(value) >= 1000:
        return str(int(value))  # counts, not 1.714e+04
    return f"{value:.4g}"


def _ratio(value: float) -> str:
    # Two decimals, but never rounded to 0.00x: plain beats a copy-up by 1000x.
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def _status(results: dict, workload: str, target: str) -> str:
    if target in results["skipped"]:
        return "skipped"
    errors = [m for m in results["measurements"] if m["workload"] == workload]
    errors = [m for m in errors if m["target"] == target and "error" in m]
    return "error" if errors else "—"


def _get(med: dict, workload: str, target: str, metric: str) -> float | None:
    return med.get(workload, {}).get(target, {}).get(metric)


def timed_table(results: dict, med: dict) -> list[str]:
    targets = results["targets"]
    ratios = _ratio_columns(targets)
    head = ["workload", *[f"{t} (s)" for t in targets], *[f"{t} / {b}" for t, b in ratios]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in results["workloads"]:
        if results["kinds"][name] != "time":
            continue
        row = [results["labels"][name]]
        for t in targets:
            v = _get(med, name, t, "seconds")
            row.append(_cell(v) if v is not None else _status(results, name, t))
        for t, base in ratios:
            num, den = _get(med, name, t, "seconds"), _get(med, name, base, "seconds")
            row.append(_ratio(num / den) if num is not None and den else "—")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def memory_table(results: dict, med: dict) -> list[str]:
    name = "daemon_rss"
    lines = [
        f"Daemon VmRSS (MiB, median): {results['labels'][name]}, then "
        "`echo 2 > /proc/sys/vm/drop_caches` so the kernel forgets them.",
        "",
        "| target | mounted | after the walk | after the forget | entries walked |",
        "|---|---|---|---|---|",
    ]
    for t in results["targets"]:
        if t not in ("fuse-overlayfs", "pyoverlay"):
            continue
        keys = ("rss_mounted_mib", "rss_after_walk_mib", "rss_after_forget_mib", "entries")
        cells = [_get(med, name, t, k) for k in keys]
        if cells[0] is None:
            lines.append(f"| {t} | {_status(results, name, t)} | | | |")
        else:
            lines.append(f"| {t} | " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def latency_table(results: dict, med: dict) -> list[str]:
    name = "copyup_stat_p99"
    lines = [
        f"{results['labels'][name]}: lstat() of other files from a second process, "
        "during open(O_WRONLY|O_APPEND)+write of the file (medians over runs).",
        "",
        "| target | p99 (ms) | max (ms) | stats in window | p99 of first stats of a path (ms) "
        "| such stats | copy-up to first write (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = ("p99_ms", "max_ms", "samples", "p99_uncached_ms", "uncached_samples", "copyup_s")
    for t in results["targets"]:
        if t == "plain":
            continue
        cells = [_get(med, name, t, k) for k in keys]
        if cells[0] is None:
            lines.append(f"| {t} | {_status(results, name, t)} | | | | | |")
        else:
            lines.append(f"| {t} | " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def sanity_lines(results: dict, med: dict) -> list[str]:
    """Entry counts must agree across targets, or the comparison is not fair."""
    expected = results["fixture"]["merged_entries"]
    out = []
    for name in ("walk_cold", "walk_warm"):
        for t in results["targets"]:
            got = _get(med, name, t, "entries")
            if got is not None and int(got) != expected:
                out.append(f"- {name} on {t} counted {int(got)} entries, expected {expected}")
    return out


def render(results: dict) -> str:
    med = medians(results["measurements"])
    lines = ["# pyoverlay benchmark", "", f"Command: `{results['command']}`", ""]
    lines += [f"Started {results['started']}, finished {results['finished']}.", ""]
    lines += ["| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in results["machine"].items()]
    runs = results["runs"]
    lines += ["", f"## Medians of {runs} run(s), seconds, with ratios (lower is better)", ""]
    lines += timed_table(results, med)
    if "daemon_rss" in results["workloads"]:
        lines += ["", "## Daemon memory", "", *memory_table(results, med)]
    if "copyup_stat_p99" in results["workloads"]:
        lines += ["", "## Stat latency during a copy-up", "", *latency_table(results, med)]
    notes = sanity_lines(results, med)
    if notes:
        lines += ["", "## Entry counts that disagree", "", *notes]
    if results["skipped"]:
        lines += ["", "## Skipped targets", ""]
        lines += [f"- {t}: {why}" for t, why in results["skipped"].items()]
    errors = [m for m in results["measurements"] if "error" in m]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [
            f"- run {m['run']} {m['workload']} on {m['target']}: {m['error']}" for m in errors
        ]
    lines += ["", _method_note(results)]
    return "\n".join(lines) + "\n"


def _method_note(results: dict) -> str:
    return (
        "Method: every measurement mounts a fresh overlay (fresh upper/work copied from the "
        "fixture; the kernel with " + results["kernel_options"] + "); cold ones run after "
        "`sync; echo 3 > /proc/sys/vm/drop_caches`, warm ones after an untimed pass. "
        "Workloads are interleaved across targets, with the target order rotated per run. "
        "Tar is `tar -cf - . | cat > /dev/null` so file data is read."
    )


# --- chart -------------------------------------------------------------------------------


def _import_pyplot(allow_install: bool):
    try:
        import matplotlib
    except ImportError:
        if not allow_install:
            return None
        print("bench: matplotlib missing; installing it into this Python's environment")
        pip = [sys.executable, "-m", "pip", "install", "-q", "matplotlib"]
        if subprocess.run(pip, check=False).returncode != 0:
            return None
        try:
            import matplotlib
        except ImportError:
            return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_chart(results: dict, path: str, allow_install: bool = True) -> str:
    """Grouped bars of each target's ratio to the kernel; returns a one-line outcome."""
    plt = _import_pyplot(allow_install)
    if plt is None:
        return "chart skipped: matplotlib could not be imported (pip install matplotlib)"
    med = medians(results["measurements"])
    names = [n for n in results["workloads"] if results["kinds"][n] == "time"]
    others = [t for t in results["targets"] if t != "kernel"]
    if "kernel" not in results["targets"] or not others:
        return "chart skipped: it plots ratios to the kernel target, which was not run"
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(names) + 2))
    height = 0.8 / len(others)
    for i, t in enumerate(others):
        ratios = []
        for n in names:
            num, den = _get(med, n, t, "seconds"), _get(med, n, "kernel", "seconds")
            ratios.append(num / den if num is not None and den else 0.0)
        ys = [j + i * height for j in range(len(names))]
        ax.barh(ys, ratios, height=height, label=t)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    # Plain beats a copy-up ~1000x; without a floor that bar squeezes every other one.
    ax.set_xlim(left=0.05)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(names))])
    ax.set_yticklabels([results["labels"][n] for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median time / kernel overlayfs (log scale, lower is better; cut at 0.05)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"


def write_all(results: dict, outdir: str, chart: bool, allow_install: bool) -> str:
    """Write report.md, results.json and chart.png; returns the markdown."""
    Path(outdir).mkdir(parents=True, exist_ok=True)
    results["medians"] = medians(results["measurements"])
    text = render(results)
    Path(outdir, "report.md").write_text(text)
    Path(outdir, "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    if chart:
        print(write_chart(results, os.path.join(outdir, "chart.png"), allow_install))
    return text
