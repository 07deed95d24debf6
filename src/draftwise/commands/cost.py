"""`draftwise cost`: $ per 1M output tokens, GPUs and monthly bill, with and without speculation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "cost", help="what speculation saves on a self-hosted GPU bill (from results.json or numbers)",
        description="Turn tokens/s per GPU into $ per 1M output tokens, target forward passes per output token, "
                    "GPUs needed and monthly cost, with and without speculation. Give --results FILE (from "
                    "`draftwise bench`) or --tokens-per-second (alone: the plain cost) with --speculative-tokens-per-second "
                    "or --speedup.",
    )
    p.add_argument("--results", default=None, metavar="FILE", help="results.json written by draftwise bench")
    p.add_argument("--gpu-hour-price", type=float, default=2.00, help="$ per GPU-hour (default 2.00)")
    p.add_argument("--tokens-per-second", type=float, default=None, help="plain decoding output tokens/s per GPU")
    p.add_argument("--speculative-tokens-per-second", type=float, default=None, help="with speculation")
    p.add_argument("--speedup", type=float, default=None, help="or: speculative tokens/s = plain x SPEEDUP")
    p.add_argument("--passes-per-token", type=float, default=None,
                   help="target forward passes per output token with speculation (plain = 1.00)")
    p.add_argument("--requests-per-day", type=float, default=100_000, help="workload (default 100,000)")
    p.add_argument("--output-tokens-per-request", type=float, default=500, help="workload (default 500)")
    p.add_argument("--method", action="append", default=[], help="with --results: only these methods (repeatable; default: every draftwise speculator)")
    p.set_defaults(run=run)


def lines_from_results(path: str, work, only: list[str]):
    from draftwise.bench.cost import cost_line
    from draftwise.errors import BadInput

    try:
        data = json.loads(Path(path).read_text())
        results = data["results"]
        plain = results["plain"]["overall"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise BadInput(f"{path} is not a draftwise bench results.json ({e})") from None
    if not plain.get("tokens_per_second"):
        raise BadInput(f"{path}: plain decoding has no tokens/s")
    lines = [cost_line("plain", work, plain["tokens_per_second"], plain.get("target_passes_per_token") or 1.0)]
    unknown = [m for m in only if m not in results]
    if unknown:
        raise BadInput(f"{path} has no method {', '.join(unknown)}; it has: {', '.join(results)}")
    peers = {m.get("label") for m in data.get("methods", []) if m.get("kind") == "peer"}
    for label, res in results.items():
        row = res["overall"]
        wanted = label in only if only else label not in peers  # peers only when named
        if label == "plain" or not wanted or not row.get("tokens_per_second"):
            continue
        lines.append(cost_line(label, work, row["tokens_per_second"], row.get("target_passes_per_token")))
    return lines


def run(args: argparse.Namespace) -> int:
    from draftwise.bench.cost import Workload, cost_line, format_table, speculative_tokens_per_second
    from draftwise.errors import BadInput

    for name in ("gpu_hour_price", "requests_per_day", "output_tokens_per_request"):
        if getattr(args, name) <= 0:
            raise BadInput(f"--{name.replace('_', '-')} must be positive")
    work = Workload(args.gpu_hour_price, args.requests_per_day, args.output_tokens_per_request)
    if args.results:
        if args.tokens_per_second or args.speculative_tokens_per_second or args.speedup:
            raise BadInput("give either --results or the tokens/s numbers, not both")
        print(format_table(work, lines_from_results(args.results, work, args.method)))
        return 0
    if not args.tokens_per_second or args.tokens_per_second <= 0:
        raise BadInput("give --results FILE, or --tokens-per-second (plain, per GPU) and "
                       "--speculative-tokens-per-second or --speedup")
    if args.speculative_tokens_per_second is not None and args.speedup is not None:
        raise BadInput("give one of --speculative-tokens-per-second and --speedup, not both")
    if args.speculative_tokens_per_second is None and args.speedup is None:  # what plain decoding costs
        print(format_table(work, [cost_line("plain", work, args.tokens_per_second, 1.0)]))
        return 0
    spec_tps = args.speculative_tokens_per_second or speculative_tokens_per_second(args.tokens_per_second, args.speedup)
    if spec_tps <= 0:
        raise BadInput("speculative tokens/s must be positive")
    if args.passes_per_token is not None and args.passes_per_token <= 0:
        raise BadInput("--passes-per-token must be positive")
    lines = [cost_line("plain", work, args.tokens_per_second, 1.0),
             cost_line("speculative", work, spec_tps, args.passes_per_token)]
    print(format_table(work, lines))
    return 0
