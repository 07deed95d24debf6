"""`draftwise models`: list the bundled models and the shipped speculation heads."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the bundled models and shipped heads",
                       description="List the bundled models and the speculation heads shipped with draftwise.")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from draftwise.heads import SHIPPED
    from draftwise.models.bundled import BUNDLED

    for name, b in BUNDLED.items():
        print(f"{name:22s} {b.description}")
    print("\nheads (--speculator METHOD --draft-model NAME):")
    for name, h in SHIPPED.items():
        print(f"{name:22s} {h.method}: {h.description}")
    return 0
