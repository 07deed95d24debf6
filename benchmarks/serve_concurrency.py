"""Serving throughput and latency at several concurrencies, speculation on and off, in one run.

Loads the target once and serves it over loopback twice with `draftwise serve`'s app
(continuous batching): one server plain, one with speculation (same weights, same
prompts). `draftwise loadtest` drives them at each concurrency, alternating between the
two `--repeats` times, so that the machine's drift hits both alike; the speculative
server's controller keeps what it learned across runs, as a long-running server would.
Prints output tokens/s, mean TTFT and TPOT (medians over the repeats) and the median of
the paired ratios speculative / plain per concurrency, with the machine named.

    python benchmarks/serve_concurrency.py --model qwen2.5-coder-1.5b --requests 16 --repeats 3 \
        --speculative-config '{"method": "draft_model", "model": "qwen2.5-coder-0.5b"}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics

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


def measure(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    return asyncio.run(run_loadtest(url, concurrency=concurrency, requests=max(requests, concurrency),
                                    max_tokens=max_tokens, prompts=PROMPTS, ignore_eos=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--speculative-config", default='{"method": "suffix"}')
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level (at least the level)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--repeats", type=int, default=2, help="plain / speculative pairs per concurrency")
    args = ap.parse_args()

    batch = max(args.concurrency)
    plain = LLM(args.model, dtype=args.dtype, max_batch_size=batch)
    spec = LLM.from_model(plain.model, plain.tokenizer, speculative_config=args.speculative_config,
                          max_batch_size=batch)
    runs: dict[int, dict[str, list[dict]]] = {c: {"plain": [], "speculative": []} for c in args.concurrency}
    with ServerThread(create_app(plain)) as plain_server, ServerThread(create_app(spec)) as spec_server:
        for c in args.concurrency:
            for _ in range(args.repeats):
                for label, server in (("plain", plain_server), ("speculative", spec_server)):
                    runs[c][label].append(measure(server.url, c, args.requests, args.max_tokens))

    info = machine_info(args.dtype, "")
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}")
    print(f"model: {args.model} ({args.dtype}), speculation: {json.loads(args.speculative_config)}, "
          f"{args.max_tokens} tokens per request, {args.repeats} alternating pairs per level (medians)")
    print(f"{'concurrency':>11} | {'plain tok/s':>11} | {'spec tok/s':>10} | {'ratio':>5} | "
          f"{'plain TTFT ms':>13} | {'spec TTFT ms':>12} | {'plain TPOT ms':>13} | {'spec TPOT ms':>12}")
    for c in args.concurrency:
        pairs = list(zip(runs[c]["plain"], runs[c]["speculative"]))
        ratio = statistics.median(b["output_throughput"] / a["output_throughput"] for a, b in pairs
                                  if a["output_throughput"])
        p, s = ({k: statistics.median(r[k] for r in runs[c][label]) for k in
                 ("output_throughput", "mean_ttft_ms", "mean_tpot_ms")} for label in ("plain", "speculative"))
        print(f"{c:>11} | {p['output_throughput']:>11.2f} | {s['output_throughput']:>10.2f} | {ratio:>5.2f} | "
              f"{p['mean_ttft_ms']:>13.0f} | {s['mean_ttft_ms']:>12.0f} | {p['mean_tpot_ms']:>13.1f} | "
              f"{s['mean_tpot_ms']:>12.1f}")
    for c in args.concurrency:
        pairs = zip(runs[c]["plain"], runs[c]["speculative"])
        print(f"concurrency {c}: paired ratios " + ", ".join(
            f"{b['output_throughput'] / a['output_throughput']:.2f}" for a, b in pairs if a["output_throughput"]))


if __name__ == "__main__":
    main()
