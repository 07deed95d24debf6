"""Serving throughput and latency at several concurrencies, speculation on and off, in one run.

Loads the target once, serves it over loopback with `draftwise serve`'s app (continuous
batching), and drives it with `draftwise loadtest` at each concurrency: first plain
decoding, then the same with speculation (switched with `LLM.set_speculation`, same
weights, same prompts). Prints output tokens/s, mean TTFT and TPOT, and the ratio
speculative / plain per concurrency, with the machine named.

    python benchmarks/serve_concurrency.py --model qwen2.5-coder-1.5b \
        --speculative-config '{"method": "draft_model", "model": "qwen2.5-coder-0.5b"}'
"""

from __future__ import annotations

import argparse
import asyncio
import json

from draftwise.api import LLM
from draftwise.bench.report import machine_info
from draftwise.server.app import create_app
from draftwise.server.loadtest import run_loadtest
from draftwise.server.runner import ServerThread

PROMPTS = [
    "def binary_search(items, target):",
    "Write a haiku about the sea.",
    "Explain what a hash map is to a new programmer.",
    "class Stack:\n    \"\"\"A LIFO stack.\"\"\"\n",
]


def measure(llm: LLM, concurrencies: list[int], requests_per_level: int, max_tokens: int) -> dict[int, dict]:
    out = {}
    with ServerThread(create_app(llm)) as server:
        for c in concurrencies:
            out[c] = asyncio.run(run_loadtest(server.url, concurrency=c, requests=max(requests_per_level, c),
                                              max_tokens=max_tokens, prompts=PROMPTS, ignore_eos=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--speculative-config", default='{"method": "suffix"}')
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level (at least the level)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()

    llm = LLM(args.model, dtype=args.dtype, max_batch_size=max(args.concurrency))
    results = {}
    for label, spec in (("plain", None), ("speculative", args.speculative_config)):
        llm.set_speculation(spec)
        results[label] = measure(llm, args.concurrency, args.requests, args.max_tokens)

    info = machine_info(args.dtype, "")
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}")
    print(f"model: {args.model} ({args.dtype}), speculation: {json.loads(args.speculative_config)}, "
          f"{args.max_tokens} tokens per request")
    print(f"{'concurrency':>11} | {'plain tok/s':>11} | {'spec tok/s':>10} | {'ratio':>5} | "
          f"{'plain TTFT ms':>13} | {'spec TTFT ms':>12} | {'plain TPOT ms':>13} | {'spec TPOT ms':>12}")
    for c in args.concurrency:
        p, s = results["plain"][c], results["speculative"][c]
        ratio = s["output_throughput"] / p["output_throughput"] if p["output_throughput"] else 0.0
        print(f"{c:>11} | {p['output_throughput']:>11.2f} | {s['output_throughput']:>10.2f} | {ratio:>5.2f} | "
              f"{p['mean_ttft_ms']:>13.0f} | {s['mean_ttft_ms']:>12.0f} | {p['mean_tpot_ms']:>13.1f} | "
              f"{s['mean_tpot_ms']:>12.1f}")


if __name__ == "__main__":
    main()
