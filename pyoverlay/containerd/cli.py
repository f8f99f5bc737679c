"""The ``pyoverlay containerd`` subcommands: images, snapshots, mount, verify, check.

All of them read a containerd root (default /var/lib/containerd) whether containerd runs
or not, and never write to it. verify and check exit 1 when they find a problem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING

from pyoverlay.errors import UsageError

if TYPE_CHECKING:  # the store is imported on use: other pyoverlay commands start faster
    from pyoverlay.containerd.store import ContainerdRoot, Image
    from pyoverlay.containerd.verify import ImageResult

DEFAULT_ROOT = "/var/lib/containerd"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``containerd`` command group to the top-level parser."""
    group = subparsers.add_parser(
        "containerd",
        help="inspect a containerd root: list, mount and verify snapshots",
        description="Inspect a containerd root (read-only): list, mount and verify snapshots.",
    )
    sub = group.add_subparsers(
        dest="ctrd_command",
        required=True,
        parser_class=type(group),
        metavar="{images,snapshots,mount,verify,check}",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=DEFAULT_ROOT, help="containerd root directory")
    scope = common.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", help="only this namespace")
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="every namespace (the default)"
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")

    images = sub.add_parser("images", parents=[common], help="images, layers and snapshots")
    images.add_argument("names", nargs="*", metavar="IMAGE", help="only these images")
    images.set_defaults(func=cmd_images)

    snapshots = sub.add_parser("snapshots", parents=[common], help="every snapshot record")
    snapshots.add_argument("--no-size", action="store_true", help="skip measuring disk usage")
    snapshots.set_defaults(func=cmd_snapshots)

    mount = sub.add_parser(
        "mount",
        parents=[common],
        help="mount an image, container or snapshot read-only",
        description="Mount IMAGE|CONTAINER|SNAPSHOT read-only at MERGED through pyoverlay.",
    )
    mount.add_argument("name", metavar="IMAGE|CONTAINER|SNAPSHOT")
    mount.add_argument("mountpoint", metavar="MERGED")
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    mount.add_argument(
        "--print-lowerdir", action="store_true", help="print the layer chain instead of mounting"
    )
    mount.set_defaults(func=cmd_mount)

    verify = sub.add_parser(
        "verify", parents=[common], help="compare snapshots with their layer blobs"
    )
    verify.add_argument("names", nargs="*", metavar="IMAGE")
    verify.add_argument(
        "--all", action="store_true", help="every image (the default when none is named)"
    )
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")
    verify.set_defaults(func=cmd_verify)

    check = sub.add_parser(
        "check", parents=[common], help="snapshot records, directories and blob digests"
    )
    check.add_argument("--no-blobs", action="store_true", help="skip hashing the content store")
    check.add_argument("--no-progress", action="store_true", help="no progress bar")
    check.set_defaults(func=cmd_check)


def _open(args: argparse.Namespace) -> ContainerdRoot:
    from pyoverlay.containerd.store import ContainerdError, ContainerdRoot

    if not os.path.isdir(args.root):
        raise ContainerdError(f"{args.root}: no such directory")
    return ContainerdRoot(args.root)


def _namespaces(root: ContainerdRoot, args: argparse.Namespace) -> list[str]:
    from pyoverlay.containerd.store import ContainerdError

    if args.namespace:
        if args.namespace not in root.namespaces():
            raise ContainerdError(f"namespace {args.namespace!r} does not exist in {root.root}")
        return [args.namespace]
    return root.search_order(None)


def _emit_json(doc: object) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _short(digest: str) -> str:
    return digest[:19] if digest.startswith("sha256:") else digest


class ProgressBar:
    """A one-line progress bar on stderr, drawn only on a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = max(total, 1)
        self.enabled = enabled and sys.stderr.isatty()
        self.base = 0
        self.label = ""
        self.last = 0.0

    def start(self, label: str) -> None:
        self.label = label

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.1:
            return
        self.last = now
        frac = min(1.0, (self.base + done) / self.total)
        bar = "#" * int(frac * 30)
        text = f"\r[{bar:<30}] {frac * 100:3.0f}% {(self.base + done) / 1e6:.1f}MB {self.label}"
        sys.stderr.write(text[:120].ljust(120))
        sys.stderr.flush()

    def advance(self, amount: int) -> None:
        self.base += amount

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 120 + "\r")
            sys.stderr.flush()


# images ------------------------------------------------------------------------
def _image_dict(image: Image) -> dict:
    return {
        "namespace": image.namespace,
        "name": image.name,
        "digest": image.digest,
        "media_type": image.media_type,
        "manifest": image.manifest,
        "config": image.config,
        "error": image.error,
        "layers": [
            {
                "index": layer.index,
                "digest": layer.digest,
                "media_type": layer.media_type,
                "size": layer.size,
                "diff_id": layer.diff_id,
                "chain_id": layer.chain_id,
                "snapshot_id": layer.snapshot.id if layer.snapshot else None,
                "directory": layer.snapshot.fs if layer.snapshot else None,
                "exists": bool(layer.snapshot and os.path.isdir(layer.snapshot.fs)),
            }
            for layer in image.layers
        ],
    }


def _selected_images(
    root: ContainerdRoot, args: argparse.Namespace, names: list[str]
) -> list[Image]:
    from pyoverlay.containerd.store import ContainerdError, normalize_ref

    wanted = {n for name in names for n in (name, normalize_ref(name))}
    found: set[str] = set()
    result = []
    for namespace in _namespaces(root, args):
        for image in root.images(namespace):
            if not names or image.name in wanted:
                result.append(image)
                found.add(image.name)
    missing = [n for n in names if n not in found and normalize_ref(n) not in found]
    if missing:
        raise ContainerdError(f"no image named {missing[0]!r} in {root.root}")
    return result


def cmd_images(args: argparse.Namespace) -> int:
    from pyoverlay.containerd.verify import printable

    root = _open(args)
    images = _selected_images(root, args, args.names)
    if args.json:
        _emit_json({"root": root.root, "images": [_image_dict(i) for i in images]})
        return 0
    for image in images:
        print(f"{printable(image.name)}  [{printable(image.namespace)}]  {image.digest}")
        if image.error:
            print(f"  error: {image.error}")
        for layer in image.layers:
            snap = layer.snapshot
            if snap is None:
                where = "not unpacked"
            else:
                state = "ok" if os.path.isdir(snap.fs) else "MISSING"
                where = f"snapshot {snap.id}  {snap.fs}  {state}"
            print(f"  layer {layer.index}  {_short(layer.digest)}  {where}")
    return 0


# snapshots ---------------------------------------------------------------------
def cmd_snapshots(args: argparse.Namespace) -> int:
    from pyoverlay.containerd.fsread import disk_usage

    root = _open(args)
    snaps = sorted(root.snapshots().values(), key=lambda s: s.id)
    if args.namespace:
        snaps = [s for s in snaps if s.namespace == args.namespace]
    by_name = root.snapshots()
    rows = []
    for snap in snaps:
        exists = os.path.isdir(snap.fs)
        size = disk_usage(snap.fs) if exists and not args.no_size else None
        parent = by_name.get(snap.parent) if snap.parent else None
        rows.append(
            {
                "id": snap.id,
                "kind": snap.kind,
                "parent": parent.id if parent else None,
                "key": snap.name,
                "namespace": snap.namespace,
                "directory": snap.fs,
                "exists": exists,
                "size": size,
            }
        )
    if args.json:
        _emit_json({"root": root.root, "snapshots": rows})
        return 0
    print(f"{'ID':>4} {'KIND':<9} {'PARENT':>6} {'SIZE':>10}  KEY  DIRECTORY")
    for row in rows:
        size = "missing" if not row["exists"] else _human(row["size"])
        parent = "-" if row["parent"] is None else str(row["parent"])
        print(
            f"{row['id']:>4} {row['kind']:<9} {parent:>6} {size:>10}  {row['key']}  "
            f"{row['directory']}"
        )
    return 0


def _human(size: int | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return str(size)


# mount -------------------------------------------------------------------------
def cmd_mount(args: argparse.Namespace) -> int:
    from pyoverlay.containerd.store import ContainerdError
    from pyoverlay.params import MountOptions

    root = _open(args)
    target = root.resolve(args.name, args.namespace)
    if target.also_in:
        print(
            f"pyoverlay: {args.name}: using namespace {target.namespace} "
            f"(also in {', '.join(target.also_in)}; pick one with --namespace)",
            file=sys.stderr,
        )
    from pyoverlay.containerd.fsread import is_real_dir

    bad = [snap.fs for snap in target.chain if not is_real_dir(snap.fs)]
    if bad:
        raise ContainerdError(
            f"{target.kind} {target.name}: snapshot dir {bad[0]} is missing or not a directory"
        )
    lowerdirs = [snap.fs for snap in target.chain]
    if args.print_lowerdir:
        if args.json:
            doc = {"kind": target.kind, "namespace": target.namespace, "name": target.name}
            _emit_json({**doc, "lowerdirs": lowerdirs})
        else:
            print(":".join(d.replace("\\", "\\\\").replace(":", "\\:") for d in lowerdirs))
        return 0
    if not os.path.isdir(args.mountpoint):
        raise UsageError(f"{args.mountpoint}: mount point is not a directory")
    from pyoverlay import super as overlay_super

    opts = MountOptions(lowerdirs=lowerdirs, read_only=True, noatime=True)
    if target.chain[0].kind != "committed":
        # A running container keeps writing its top layer: let the kernel cache nothing.
        opts.cache = "none"
    overlay_super.mount(opts, args.mountpoint, foreground=args.foreground)
    return 0


# verify ------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    from pyoverlay.containerd.verify import verify_image

    if args.names and args.all:
        raise UsageError("containerd verify: give image names or --all, not both")
    root = _open(args)
    images = _selected_images(root, args, args.names)
    total = sum(layer.size for image in images for layer in image.layers)
    bar = ProgressBar(total, not args.no_progress and not args.json)
    done: dict[int, str] = {}
    results = []
    try:
        for image in images:
            bar.start(image.name)
            result = verify_image(root, image, done, bar.update)
            for layer_result in result.layers:
                bar.advance(layer_result.layer.size)
            results.append(result)
            if not args.json:
                bar.close()
                _print_image_result(result)
    finally:
        bar.close()
    problems = sum(r.problems for r in results)
    layers = sum(1 for r in results for lr in r.layers if lr.same_as is None and not lr.skipped)
    skipped = sum(1 for r in results for lr in r.layers if lr.skipped)
    data = sum(lr.uncompressed for r in results for lr in r.layers)
    if args.json:
        _emit_json(
            {
                "root": root.root,
                "images": [r.as_dict() for r in results],
                "problems": problems,
                "skipped_layers": skipped,
            }
        )
    else:
        print(
            f"verified {layers} layers of {len(results)} images "
            f"({data / 1e6:.1f} MB uncompressed): "
            + (f"{problems} problems" if problems != 1 else "1 problem")
            + (f"; {skipped} layers not checked (blob discarded)" if skipped else "")
        )
    return 1 if problems else 0


def _print_image_result(result: ImageResult) -> None:
    from pyoverlay.containerd.verify import printable

    image = result.image
    print(f"{printable(image.name)}  [{printable(image.namespace)}]  {image.digest}")
    for finding in result.findings:
        print(f"    {finding.line()}")
    count = len(result.layers)
    for lr in result.layers:
        snap = lr.layer.snapshot
        where = f"snapshot {snap.id}" if snap else "no snapshot"
        head = f"  layer {lr.layer.index + 1}/{count} {_short(lr.layer.digest)} {where}:"
        if lr.same_as:
            print(f"{head} checked above with {lr.same_as}")
        elif lr.skipped and not lr.findings:
            print(f"{head} not checked: {lr.skipped}")
        elif not lr.findings:
            print(f"{head} ok")
        else:
            print(f"{head} {len(lr.findings)} problem{'s' if len(lr.findings) > 1 else ''}")
            if snap:
                print(f"    in {snap.fs}")
            for finding in lr.findings:
                print(f"    {finding.line()}")


# check -------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    from pyoverlay.containerd.check import blob_bytes, check_blobs, check_snapshots

    root = _open(args)
    findings = check_snapshots(root)
    if not args.no_blobs:
        bar = ProgressBar(blob_bytes(root), not args.no_progress and not args.json)
        bar.start("content store")
        try:
            findings += check_blobs(root, bar.update)
        finally:
            bar.close()
    if args.json:
        _emit_json(
            {
                "root": root.root,
                "findings": [f.as_dict() for f in findings],
                "problems": len(findings),
            }
        )
    else:
        for finding in findings:
            print(finding.line())
        print(f"checked {root.root}: " + (f"{len(findings)} problems" if findings else "clean"))
    return 1 if findings else 0
