"""What Ray Serve adds: the single-process server against 1 and 2 Ray Serve replicas, in one run.

Starts the single-process server (`draftwise serve`, a process of its own, with as many
torch threads as Ray gives a replica of `--cpus-per-replica` CPUs) and a Ray Serve
application (what `draftwise serve --replicas` builds) with 1 replica, then with 2, over
loopback; the load generator runs in this process. `draftwise loadtest` drives each at every concurrency, taking
turns `--repeats` times; prints output tokens/s and mean TTFT (medians over the repeats),
and the overhead of one Ray replica against the single server at concurrency 1. On a
2-core machine two replicas cannot be faster than one: they share the same cores.

    python benchmarks/ray_overhead.py --model smollm2-135m --requests 16 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from datetime import date

import httpx

from draftwise.bench.report import machine_info
from draftwise.server.loadtest import run_loadtest
from draftwise.server.ray_serve import APP_NAME, build_application, run_application, start_ray
from draftwise.server.settings import ServerSettings

PROMPTS = ["def binary_search(items, target):", "Write a haiku about the sea.",
           "Explain what a hash map is to a new programmer.", "class Stack:\n    \"\"\"A LIFO stack.\"\"\"\n"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    return asyncio.run(run_loadtest(url, concurrency=concurrency, requests=max(requests, concurrency),
                                    max_tokens=max_tokens, prompts=PROMPTS, ignore_eos=True))


def ray_app(args, replicas: int, port: int) -> str:
    """Deploy with `replicas` replicas behind Serve's proxy on `port` (Serve keeps the port of
    its first start for every later application)."""
    settings = ServerSettings(model=args.model, dtype=args.dtype, max_batch_size=args.max_batch_size,
                               served_model_name=args.model)
    run_application(build_application(settings, replicas=replicas, num_cpus=args.cpus_per_replica), "127.0.0.1", port,
                    blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    return url


def wait_healthy(url: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not come up")
        time.sleep(1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpus-per-replica", type=float, default=1.0)
    args = ap.parse_args()
    from ray import serve

    print(machine_info(args.dtype, str(date.today())))
    levels = [int(c) for c in args.concurrency.split(",")]
    start_ray(None, num_cpus=2)
    results: dict[tuple[str, int], list[dict]] = {}
    port, single_port = free_port(), free_port()
    threads = str(max(1, int(args.cpus_per_replica)))  # what Ray sets OMP_NUM_THREADS to in a replica
    single = subprocess.Popen([sys.executable, "-m", "draftwise", "serve", "--model", args.model, "--dtype", args.dtype,
                               "--max-batch-size", str(args.max_batch_size), "--port", str(single_port),
                               "--log-level", "warning"], env={**os.environ, "OMP_NUM_THREADS": threads})
    single_url = f"http://127.0.0.1:{single_port}"
    try:
        wait_healthy(single_url)
        for replicas in (1, 2):
            url = ray_app(args, replicas, port)
            names = {"single": single_url, f"ray x{replicas}": url}
            for c in levels:
                measure(url, c, c, 8)  # warm-up of this shape
                for _ in range(args.repeats):
                    for name, u in names.items():
                        results.setdefault((name, c), []).append(measure(u, c, args.requests, args.max_tokens))
            serve.delete(APP_NAME)
    finally:
        single.terminate()
        single.wait(60)
    print(f"\n{args.model} {args.dtype}, {args.requests} requests x {args.max_tokens} tokens per run, "
          f"median of {args.repeats}")
    print(f"{'server':>10} {'conc':>5} {'tokens/s':>9} {'mean TTFT ms':>13}")
    for (name, c), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        tps = statistics.median(r["output_throughput"] for r in runs)
        ttft = statistics.median(r["mean_ttft_ms"] for r in runs)
        print(f"{name:>10} {c:>5} {tps:>9.1f} {ttft:>13.1f}")
    single_runs, ray_runs = results[("single", levels[0])], results[("ray x1", levels[0])]
    ratios = [r["output_throughput"] / s["output_throughput"] for r, s in zip(ray_runs, single_runs)]
    dttft = [(r["mean_ttft_ms"] - s["mean_ttft_ms"]) for r, s in zip(ray_runs, single_runs)]
    print(f"\nRay, 1 replica, against the single server at concurrency {levels[0]}: tokens/s x"
          f"{statistics.median(ratios):.3f} (paired median), TTFT {statistics.median(dttft):+.1f} ms")
    serve.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
