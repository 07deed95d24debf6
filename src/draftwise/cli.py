"""Command line: `draftwise generate | pull | models`.

Errors a user can fix (unknown model, bad value, prompt too long, ...) are printed as one
line starting with `error:` and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from pydantic import ValidationError

from draftwise.config import one_line
from draftwise.errors import DraftwiseError


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except DraftwiseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="draftwise",
        description="Lossless speculative decoding: the same output as the model alone, in fewer target passes.",
    )
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    from draftwise.commands import generate, models

    generate.add_parser(sub)
    models.add_parsers(sub)
    return p


if __name__ == "__main__":
    sys.exit(main())
