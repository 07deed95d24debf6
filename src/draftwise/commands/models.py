"""`draftwise models`: list the bundled models."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the bundled models", description="List the bundled models.")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from draftwise.models.bundled import BUNDLED

    for name, b in BUNDLED.items():
        print(f"{name:22s} {b.description}")
    return 0
