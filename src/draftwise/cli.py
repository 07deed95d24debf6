"""Command line: `draftwise COMMAND`, one module of draftwise/commands/ each (`COMMANDS`):

- `generate`: text for one prompt (streamed), with optional speculation;
- `serve`: an OpenAI-compatible HTTP API (one process, or Ray Serve replicas);
- `bench`: speculators against plain decoding on a prompt set (Spec-Bench protocol);
- `cost`: what speculation saves on a self-hosted GPU bill;
- `loadtest`: load on a running OpenAI-compatible server;
- `train`: an EAGLE head or Medusa heads by self-distillation, or an adaptive state's head
  on its stored traffic;
- `stats`: what an adaptive state has learned;
- `pull`: a bundled model fetched ahead of time;
- `models`: the bundled models and shipped heads.

Errors a user can fix (unknown model, bad value, prompt too long, ...) are printed as one
line starting with `error:` and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from pydantic import ValidationError

from draftwise.config import one_line
from draftwise.errors import DraftwiseError

# each module in draftwise/commands/ has add_parser(subparsers); order = order in --help
COMMANDS = ("generate", "serve", "bench", "cost", "loadtest", "train", "stats", "pull", "models")


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
    from draftwise.version import __version__

    p.add_argument("--version", action="version", version=f"draftwise {__version__}")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"draftwise.commands.{name}")
        except ModuleNotFoundError as e:  # an optional command whose extra is not installed
            if e.name == f"draftwise.commands.{name}":
                continue
            raise
        module.add_parser(sub)
    return p


if __name__ == "__main__":
    sys.exit(main())
