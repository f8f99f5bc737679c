"""Reliability runs: the issue-7 tests at default or soak sizes, summed into one table.

    /tmp/venv/bin/python bench/soak.py                   # default sizes (as in the suite)
    /tmp/venv/bin/python bench/soak.py --soak            # long: many more kills, ops, files
    /tmp/venv/bin/python bench/soak.py --soak --crash-rounds 500 --output table.md

Runs pytest on the reliability test files with PYOVERLAY_RELIABILITY_LOG set; every
test appends what it tried and what it lost; this script sums those lines into the
markdown table that docs/reliability.md shows. Needs root (mounts, loop devices,
drop_caches); every test tears down its own mounts and daemons. Exit status is
pytest's.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_FILES = [
    "tests/integration/test_crash.py",
    "tests/integration/test_concurrency.py",
    "tests/integration/test_permissions.py",
    "tests/integration/test_hostile.py",
    "tests/integration/test_resources.py",
    "tests/integration/test_cli_fuzz.py",
    "tests/integration/test_untouched.py",
]
NOTE_CHARS = 400
ITEM_ORDER = ["crash", "concurrency", "permissions", "hostile", "resources", "cli", "untouched"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--soak", action="store_true", help="also run the long soak tests")
    p.add_argument("--crash-rounds", type=int, default=150, help="SIGKILL rounds (soak)")
    p.add_argument("--fsx-ops", type=int, default=5000, help="operations per fsx process (soak)")
    p.add_argument("--walk-files", type=int, default=100_000, help="files to walk")
    p.add_argument("--walk-cycles", type=int, default=5, help="walk/forget cycles (soak)")
    p.add_argument("--fuzz-examples", type=int, default=60, help="fuzz batches per command (soak)")
    p.add_argument("--output", help="also write the table to this file")
    p.add_argument("-k", dest="keyword", help="pytest -k expression, to run a part")
    return p.parse_args(argv)


def run_tests(args: argparse.Namespace, log: str) -> int:
    marker = "soak or not soak" if args.soak else "not soak"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker]
    if args.keyword:
        cmd += ["-k", args.keyword]
    env = dict(os.environ)
    env.update(
        PYOVERLAY_RELIABILITY_LOG=log,
        PYOVERLAY_CRASH_ROUNDS=str(args.crash_rounds),
        PYOVERLAY_FSX_OPS=str(args.fsx_ops),
        PYOVERLAY_WALK_FILES=str(args.walk_files),
        PYOVERLAY_WALK_CYCLES=str(args.walk_cycles),
        PYOVERLAY_FUZZ_SOAK=str(args.fuzz_examples),
    )
    print("+", shlex.join(cmd + TEST_FILES), flush=True)
    return subprocess.run(cmd + TEST_FILES, cwd=REPO, env=env, check=False).returncode


def table(lines: list[dict]) -> str:
    """Sum tried and lost per (item, what), in the order of the issue's list."""
    sums: dict[tuple[str, str], list] = collections.OrderedDict()
    for line in lines:
        key = (line["item"], line["what"])
        entry = sums.setdefault(key, [0, 0, []])
        entry[0] += line["tried"]
        entry[1] += line["lost"]
        if line.get("detail"):
            entry[2].append(line["detail"])
    rows = sorted(sums.items(), key=lambda kv: ITEM_ORDER.index(kv[0][0]))
    out = ["| item | what was tried | times | lost | notes |", "|---|---|---:|---:|---|"]
    for (item, what), (tried, lost, details) in rows:
        note = details[-1].replace("|", "/") if details else ""
        out.append(f"| {item} | {what} | {tried} | {lost} | {note[:NOTE_CHARS]} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("soak.py: needs root (mounts, loop devices, drop_caches)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pyoverlay-soak-") as tmp:
        log = os.path.join(tmp, "reliability.jsonl")
        open(log, "w").close()
        started = datetime.datetime.now(datetime.UTC)
        code = run_tests(args, log)
        with open(log) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    took = datetime.datetime.now(datetime.UTC) - started
    text = table(lines)
    header = (
        f"Run {started:%Y-%m-%d %H:%M} UTC, {took.total_seconds():.0f} s, "
        f"{'soak' if args.soak else 'default'} sizes, pytest exit {code}"
    )
    print(f"\n{header}\n\n{text}")
    if args.output:
        with open(args.output, "w") as f:
            f.write(f"{header}\n\n{text}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
