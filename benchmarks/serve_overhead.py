"""What the server costs one user: per-token time offline and through `draftwise serve`, in one run.

For each speculator (plain first), the same prompts go one at a time through
`LLM.generate` in this process and, as streaming completions, through a `draftwise serve`
subprocess on loopback (the way a self-hoster runs it: its own process, with this one as
the client). The two alternate request by request, `--repeats` times, so that drift hits
both alike. Per request: time to first token, and per-token time after it (TPOT: from the
first token to the last, over tokens - 1), offline taken from the engine's step outputs,
served from the SSE chunks as they arrive. Prints the medians side by side, server /
offline, the chunks per stream, and whether every greedy output is identical, with the
machine and date named.

    python benchmarks/serve_overhead.py --model smollm2-135m --speculator none suffix
    python benchmarks/serve_overhead.py --model qwen2.5-coder-1.5b --quantization w4a8-all
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

from draftwise.api import LLM
from draftwise.bench.report import machine_info
from draftwise.sampling import SamplingParams
from draftwise.server.loadtest import DEFAULT_PROMPTS


@dataclass
class Timing:
    ttft: float  # seconds from sending the request to its first token
    tpot: float  # seconds per token after the first
    token_ids: list[int]
    chunks: int = 0  # SSE chunks that carried tokens (served only)
    itl: list[float] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`draftwise serve` in a subprocess, stopped (SIGTERM) on exit."""

    def __init__(self, args: argparse.Namespace, speculator: str) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "draftwise", "serve", "--model", args.model, "--port", str(self.port),
               "--dtype", args.dtype, "--quantization", args.quantization, "--log-level", "warning",
               "--max-batch-size", "1"]
        if speculator != "none":
            cmd += ["--speculator", speculator]
            if args.draft_model:
                cmd += ["--draft-model", args.draft_model]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=600)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"draftwise serve exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if self.client.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("draftwise serve did not start within 600 s")
            time.sleep(0.5)
        self.model = self.client.get("/v1/models").json()["data"][0]["id"]

    def complete(self, prompt: str, max_tokens: int) -> Timing:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "return_token_ids": True}
        ids: list[int] = []
        times: list[float] = []
        start = time.perf_counter()
        with self.client.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    raise SystemExit(f"the server failed a request: {data['error']}")
                new = data["choices"][0].get("token_ids") or [] if data.get("choices") else []
                if new:
                    times.append(time.perf_counter())
                    ids += new
        return Timing(times[0] - start, (times[-1] - times[0]) / (len(ids) - 1), ids, len(times),
                      [b - a for a, b in zip(times, times[1:])])

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def offline(llm: LLM, prompt: str, max_tokens: int) -> Timing:
    times: list[float] = []
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    out = llm.generate(prompt, params, on_output=lambda o: times.append(time.perf_counter()))
    ids = out[0].outputs[0].token_ids
    return Timing(times[0] - start, (times[-1] - times[0]) / (len(ids) - 1), list(ids), len(times))


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--speculator", nargs="+", default=["none", "suffix"],
                    help="methods to measure (none = plain decoding; default: none suffix)")
    ap.add_argument("--draft-model", default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=len(DEFAULT_PROMPTS), help="how many of the default prompts")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the prompts")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the per-request timings here")
    args = ap.parse_args()

    prompts = DEFAULT_PROMPTS[:args.prompts]
    base = LLM(args.model, dtype=args.dtype, quantization=args.quantization, max_batch_size=1)
    rows, dump = [], {}
    for method in args.speculator:
        llm = base if method == "none" else base.with_speculation(
            {"method": method, **({"model": args.draft_model} if args.draft_model else {})})
        server = Server(args, method)
        try:
            offline(llm, prompts[0], 8), server.complete(prompts[0], 8)  # warm both
            off, srv = [], []
            for _ in range(args.repeats):
                for p in prompts:
                    off.append(offline(llm, p, args.max_tokens))
                    srv.append(server.complete(p, args.max_tokens))
        finally:
            server.close()
            if llm is not base:
                llm.close()
        same = sum(a.token_ids == b.token_ids for a, b in zip(off, srv))
        rows.append((method, median_ms([t.tpot for t in off]), median_ms([t.tpot for t in srv]),
                     median_ms([t.ttft for t in off]), median_ms([t.ttft for t in srv]),
                     statistics.median(t.chunks for t in srv), same, len(off)))
        dump[method] = {"offline": [t.__dict__ for t in off], "server": [t.__dict__ for t in srv]}

    info = machine_info(args.dtype, time.strftime("%Y-%m-%d"))
    print(f"# {args.model} ({args.quantization}, {args.dtype}), {args.max_tokens} tokens, ignore_eos, "
          f"{len(prompts)} prompts x {args.repeats}, one request at a time")
    print(f"# {info.get('cpu')}, {info['cores']} cores, torch threads {info.get('torch_threads')}, "
          f"{info['date']}")
    print("| method | offline TPOT ms | server TPOT ms | server / offline | offline TTFT ms | server TTFT ms "
          "| chunks per stream | greedy identical |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method, ot, st, of, sf, chunks, same, n in rows:
        print(f"| {method} | {ot:.1f} | {st:.1f} | {st / ot:.3f} | {of:.0f} | {sf:.0f} | {chunks:.0f} | "
              f"{same}/{n} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows, "requests": dump}, f)


if __name__ == "__main__":
    main()
