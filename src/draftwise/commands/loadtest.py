"""`draftwise loadtest`: concurrent streaming requests against a local server, vLLM-style report."""

from __future__ import annotations

import argparse
import json
import os


def add_parser(sub) -> None:
    p = sub.add_parser(
        "loadtest", help="load-test a local draftwise (or any OpenAI-compatible) server",
        description="Send --requests streaming completions, --concurrency at a time, to a server on this machine "
                    "and print request throughput, output tokens/s, TTFT / TPOT / ITL (mean, median, p50, p90, "
                    "p99) and the speculation acceptance read from its /metrics. Loopback addresses only.",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default http://127.0.0.1:8000)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    p.add_argument("--requests", type=int, default=32, help="requests in total (default 32)")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens of each request (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="temperature of each request (default 0, greedy)")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens tokens per request")
    p.add_argument("--prompt-file", default=None, help="one prompt per line (or JSON lines with a 'prompt' field)")
    p.add_argument("--timeout", type=float, default=600.0, help="total time limit in seconds (default 600)")
    p.add_argument("--api-key", default=None, help="bearer token (default: $DRAFTWISE_API_KEY)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from draftwise.errors import BadInput

    try:
        from draftwise.server.loadtest import format_report, read_prompts, run_loadtest
    except ModuleNotFoundError as e:
        raise BadInput(f"loadtest needs the 'server' extra ({e.name} is missing): "
                       "pip install 'draftwise[server]'") from None
    prompts = read_prompts(args.prompt_file)
    report = asyncio.run(run_loadtest(
        args.url, concurrency=args.concurrency, requests=args.requests, max_tokens=args.max_tokens, prompts=prompts,
        timeout=args.timeout, api_key=args.api_key or os.environ.get("DRAFTWISE_API_KEY"),
        temperature=args.temperature, ignore_eos=args.ignore_eos))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["completed"] else 1
