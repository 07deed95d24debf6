"""A small load generator for a local server: N concurrent streaming completions, vLLM-style report.

Loopback only (it refuses any other host), bounded in request count and total time.
Per request it measures time to first token (TTFT), time per output token after the
first (TPOT) and the gaps between streamed chunks (ITL); the server's acceptance comes
from the difference of its /metrics counters before and after the run.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

from draftwise.errors import BadInput

DEFAULT_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a hash map works, with an example in Python.",
    "List ten countries and their capitals, one per line.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Summarize the plot of a detective novel in five sentences.",
    "Translate to French: The cat sat on the mat. The cat sat on the mat again.",
]
MAX_REQUESTS = 100_000
MAX_CONCURRENCY = 1024
PERCENTILES = (50, 90, 99)


def check_loopback(url: str) -> str:
    """The base URL without a trailing slash; BadInput unless it points at this machine."""
    parts = urlparse(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadInput(f"--url must look like http://127.0.0.1:8000, not {url!r}")
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise BadInput(f"loadtest only targets this machine (127.0.0.1, ::1 or localhost), not {host!r}")
    return url.rstrip("/")


def read_prompts(path: str | None) -> list[str]:
    """One prompt per line (blank lines skipped); a JSON line {"prompt": ...} gives its prompt."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read --prompt-file {path}: {e}") from None
    prompts = []
    for line in lines:
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                line = str(json.loads(line)["prompt"])
            except (ValueError, KeyError, TypeError):
                pass
        prompts.append(line)
    if not prompts:
        raise BadInput(f"{path} has no prompts")
    return prompts


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, settings: dict) -> Result:
    res = Result()
    body = {"model": model, "prompt": prompt, "stream": True, "stream_options": {"include_usage": True}, **settings}
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200].decode(errors='replace')}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                now = time.perf_counter()
                if data.get("error"):
                    res.error = str(data["error"].get("message"))
                    return res
                if data.get("choices"):
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                elif data.get("usage"):
                    res.prompt_tokens = data["usage"]["prompt_tokens"]
                    res.output_tokens = data["usage"]["completion_tokens"]
        res.latency = time.perf_counter() - start
        res.ok = True
    except (httpx.HTTPError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """Speculation counters from /metrics, summed over labels ({} when unavailable)."""
    try:
        r = await client.get("/metrics")
    except httpx.HTTPError:
        return {}
    if r.status_code != 200:
        return {}
    out: dict[str, float] = {}
    pattern = re.compile(r'^vllm:(spec_decode_num_\w+?)_total(?:\{([^}]*)\})? ([0-9.eE+-]+)$')
    for line in r.text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        pos = re.search(r'position="(\d+)"', labels)
        key = f"{name}[{pos.group(1)}]" if pos else name
        out[key] = out.get(key, 0.0) + value
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: list[Result], duration: float, concurrency: int, before: dict, after: dict) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
        "itl": [x for r in ok for x in r.itl],
        "e2el": [r.latency for r in ok],
    }
    report = {
        "completed": len(ok), "failed": len(results) - len(ok), "max_concurrency": concurrency,
        "duration": duration, "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "errors": sorted({r.error for r in results if not r.ok and r.error})[:5],
    }
    for name, values in series.items():
        ms = [v * 1000 for v in values]
        report[f"mean_{name}_ms"] = sum(ms) / len(ms) if ms else 0.0
        report[f"median_{name}_ms"] = percentile(ms, 50)
        for q in PERCENTILES:
            report[f"p{q}_{name}_ms"] = percentile(ms, q)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    drafts, draft_tokens = delta.get("spec_decode_num_drafts", 0.0), delta.get("spec_decode_num_draft_tokens", 0.0)
    accepted = delta.get("spec_decode_num_accepted_tokens", 0.0)
    if after:
        positions = sorted(int(k.split("[")[1][:-1]) for k in delta if "[" in k)
        report["spec_decode"] = {
            "acceptance_rate": 100 * accepted / draft_tokens if draft_tokens else 0.0,
            "acceptance_length": 1 + accepted / drafts if drafts else 1.0,
            "drafts": int(drafts), "draft_tokens": int(draft_tokens), "accepted_tokens": int(accepted),
            "per_position_acceptance_rate": [
                100 * delta[f"spec_decode_num_accepted_tokens_per_pos[{j}]"] / drafts if drafts else 0.0
                for j in positions],
        }
    return report


async def run_loadtest(url: str, *, concurrency: int, requests: int, max_tokens: int = 128,
                       prompts: list[str] | None = None, timeout: float = 600.0, api_key: str | None = None,
                       temperature: float = 0.0, ignore_eos: bool = False) -> dict:
    base = check_loopback(url)
    if not 1 <= concurrency <= MAX_CONCURRENCY or not 1 <= requests <= MAX_REQUESTS:
        raise BadInput(f"--concurrency must be in [1, {MAX_CONCURRENCY}] and --requests in [1, {MAX_REQUESTS}]")
    if timeout <= 0 or max_tokens < 1:
        raise BadInput("--timeout and --max-tokens must be positive")
    prompts = prompts or list(DEFAULT_PROMPTS)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=httpx.Timeout(timeout), limits=limits,
                                 trust_env=False) as client:
        try:
            r = await client.get("/v1/models")
        except httpx.HTTPError as e:
            raise BadInput(f"no server at {base}: {e}") from None
        if r.status_code != 200:
            raise BadInput(f"{base}/v1/models answered {r.status_code}: {r.text[:200]}")
        model = r.json()["data"][0]["id"]
        settings = {"max_tokens": max_tokens, "temperature": temperature, "ignore_eos": ignore_eos}
        before = await scrape(client)
        gate = asyncio.Semaphore(concurrency)

        async def worker(i: int) -> Result:
            async with gate:
                return await one_request(client, model, prompts[i % len(prompts)], settings)

        start = time.perf_counter()
        tasks = [asyncio.create_task(worker(i)) for i in range(requests)]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - start
        results = [t.result() for t in tasks if t in done] + [Result(error="timed out") for _ in pending]
        after = await scrape(client)
    return summarize(results, duration, concurrency, before, after)


def format_report(rep: dict) -> str:
    lines = ["{:=^50}".format(" Serving Benchmark Result ")]

    def row(label: str, value, fmt: str = "") -> None:
        lines.append(f"{label:<40} {value:<10{fmt}}")

    row("Successful requests:", rep["completed"])
    row("Failed requests:", rep["failed"])
    row("Maximum request concurrency:", rep["max_concurrency"])
    row("Benchmark duration (s):", rep["duration"], ".2f")
    row("Total input tokens:", rep["total_input_tokens"])
    row("Total generated tokens:", rep["total_output_tokens"])
    row("Request throughput (req/s):", rep["request_throughput"], ".2f")
    row("Output token throughput (tok/s):", rep["output_throughput"], ".2f")
    row("Total Token throughput (tok/s):", rep["total_token_throughput"], ".2f")
    for key, title, name in (("ttft", "Time to First Token", "TTFT"),
                             ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                             ("itl", "Inter-token Latency", "ITL")):
        lines.append("{:-^50}".format(title))
        row(f"Mean {name} (ms):", rep[f"mean_{key}_ms"], ".2f")
        row(f"Median {name} (ms):", rep[f"median_{key}_ms"], ".2f")
        for q in PERCENTILES:
            row(f"P{q} {name} (ms):", rep[f"p{q}_{key}_ms"], ".2f")
    spec = rep.get("spec_decode")
    if spec is not None:
        lines.append("{:-^50}".format("Speculative Decoding"))
        row("Acceptance rate (%):", spec["acceptance_rate"], ".2f")
        row("Acceptance length:", spec["acceptance_length"], ".2f")
        row("Drafts:", spec["drafts"])
        row("Draft tokens:", spec["draft_tokens"])
        row("Accepted tokens:", spec["accepted_tokens"])
        per_pos = ", ".join(f"{x:.2f}" for x in spec["per_position_acceptance_rate"])
        lines.append(f"{'Per-position acceptance (%):':<40} {per_pos}")
    for err in rep.get("errors", []):
        lines.append(f"error: {err}")
    lines.append("=" * 50)
    return "\n".join(lines)
