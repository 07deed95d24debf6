"""Soak: mixed valid, invalid and disconnecting clients against one server for minutes.

Serves the model over loopback (the app `draftwise serve` runs, speculation on) and keeps
`--concurrency` clients busy for `--minutes`: each loop a client picks at random a valid
completion or chat request (streaming or not, sampled or greedy), an invalid one (bad
JSON, wrong types, invalid Unicode, unknown fields, too long), or a stream it abandons
after the first chunk. Reports requests sent per kind, valid requests lost (no complete
answer), 5xx answers (goal 0 for both), p50 / p99 time to first token of valid streams,
and resident memory at the start and the end (goal: flat; the server runs in this
process, beside the clients).

    python benchmarks/soak.py --model smollm2-135m --minutes 5 --concurrency 16
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import resource
import statistics
import threading
import time
from collections import Counter

import httpx

from draftwise.api import LLM
from draftwise.bench.report import machine_info
from draftwise.server.app import create_app
from draftwise.server.runner import ServerThread

VALID_PROMPTS = ["def add(a, b):", "Write a limerick about a cat.", "List three prime numbers.", "Hello!"]
INVALID = [
    b"{not json",
    b'{"prompt": "abc \\ud800"}',
    b'{"prompt": "x", "stream": "yes"}',
    b'{"prompt": "x", "max_tokens": "many"}',
    b'{"prompt": "x", "bogus": 1}',
    b'{"prompt": [1, 2, -5]}',
    b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
]


def rss_mib() -> float:
    """This process's resident memory now (Linux), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Soak:
    def __init__(self, url: str, max_tokens: int, seed: int) -> None:
        self.url, self.max_tokens = url, max_tokens
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.sent: Counter = Counter()
        self.lost = 0
        self.server_errors = 0
        self.ttft: list[float] = []

    def _count(self, kind: str, status: int | None = None, lost: bool = False, ttft: float | None = None) -> None:
        with self.lock:
            self.sent[kind] += 1
            self.server_errors += status is not None and status >= 500
            self.lost += lost
            if ttft is not None:
                self.ttft.append(ttft)

    def client(self, until: float) -> None:
        with httpx.Client(base_url=self.url, timeout=120, trust_env=False) as c:
            while time.monotonic() < until:
                roll = self.rng.random()
                try:
                    if roll < 0.5:
                        self._valid(c)
                    elif roll < 0.8:
                        body = self.rng.choice(INVALID)
                        r = c.post("/v1/completions" if b"prompt" in body else "/v1/chat/completions", content=body,
                                   headers={"Content-Type": "application/json"})
                        self._count("invalid", r.status_code, lost=not 400 <= r.status_code < 500)
                    else:
                        self._abandon(c)
                except httpx.HTTPError:
                    self._count("transport error", lost=True)

    def _valid(self, c: httpx.Client) -> None:
        prompt = self.rng.choice(VALID_PROMPTS)
        sampled = self.rng.random() < 0.5
        body = {"max_tokens": self.max_tokens, "temperature": 0.9 if sampled else 0, "seed": self.rng.randrange(1000)}
        chat = self.rng.random() < 0.5
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
        if self.rng.random() < 0.5:
            t0 = time.monotonic()
            first, done, status = None, False, None
            with c.stream("POST", path, json={**body, "stream": True}) as r:
                status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: ") and first is None:
                        first = time.monotonic() - t0
                    done |= line == "data: [DONE]"
            ok = status == 200 and done
            self._count("valid stream", status, lost=not ok and status != 429, ttft=first if ok else None)
        else:
            r = c.post(path, json=body)
            ok = r.status_code == 200 and "choices" in r.json()
            self._count("valid", r.status_code, lost=not ok and r.status_code != 429)

    def _abandon(self, c: httpx.Client) -> None:
        body = {"prompt": self.rng.choice(VALID_PROMPTS), "max_tokens": 4 * self.max_tokens, "stream": True,
                "ignore_eos": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # leave mid-stream
        self._count("abandoned stream", status)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--speculative-config", default='{"method": "ngram"}')
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    llm = LLM(args.model, speculative_config=args.speculative_config, max_batch_size=8)
    app = create_app(llm, max_queue=64)
    with ServerThread(app) as srv:
        start_mem = rss_mib()
        soak = Soak(srv.url, args.max_tokens, args.seed)
        until = time.monotonic() + 60 * args.minutes
        threads = [threading.Thread(target=soak.client, args=(until,)) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = time.monotonic() + 30
        while app.state.draftwise.engine.in_flight and time.monotonic() < deadline:
            time.sleep(0.1)
        end_mem = rss_mib()
        in_flight = app.state.draftwise.engine.in_flight
    ttft = sorted(soak.ttft)
    p = (lambda q: 1000 * ttft[min(len(ttft) - 1, int(q * len(ttft)))]) if ttft else (lambda q: float("nan"))
    print(f"# Soak: {args.model}, {args.speculative_config}, {args.concurrency} clients, {args.minutes:g} min")
    print(json.dumps(machine_info("bf16", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))))
    print(json.dumps({"sent": dict(soak.sent), "valid_lost": soak.lost, "server_errors_5xx": soak.server_errors,
                      "ttft_ms_p50": round(p(0.5), 1), "ttft_ms_p99": round(p(0.99), 1),
                      "ttft_ms_mean": round(1000 * statistics.mean(ttft), 1) if ttft else None,
                      "server_rss_mib_start": round(start_mem, 1), "server_rss_mib_end": round(end_mem, 1),
                      "in_flight_after": in_flight}, indent=2))


if __name__ == "__main__":
    main()
