"""The ``pyoverlay containerd`` subcommands (placeholder until the containerd work lands)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``containerd`` command group to the top-level parser."""
    subparsers.add_parser("containerd", help="inspect a containerd root (not yet available)")
