"""Replay a stream of requests in order and watch the adaptive speculator learn.

The stream is `--per-domain` questions of each of `--domains`, in that order (the second
domain is the shift): Spec-Bench categories, or the generated domains of
`stream_prompts.py` (`sql`, `extraction`: one user's traffic, fresh prompts from `--seed`).
Methods, side by side on one loaded target:

- plain: no speculation;
- static: the static part alone (`--static`, default: the shipped EAGLE head of the model
  when there is one, else ngram);
- learner: the adaptive speculator with only its learned head drafting (it learns from
  the stream as adaptive does);
- adaptive: static + learner + suffix under the controller.

`--interleave` runs every method on request i before any method moves to request i+1, so
slow drift of the machine hits all of them alike. `--think S` is the user's reading time:
after request i has run on every method, S seconds of idle follow, in which only the
adaptive methods' learners may train (learning only while idle, the default on a small CPU);
each method's background work is held while any other method is timed. With think time
the adaptive method runs request i first, right after the gap, so a request that arrives
during a training step is measured as it would be served (the step stops at a safe point).
`--state DIR` keeps adaptive's state (traffic, head, estimates) for `draftwise train
adaptive`; `--resume` goes on from the records of a run cut short (the state resumes from
DIR; the suffix caches start empty again). At `--concurrency` c, c requests of the
stream run as one batch. Per request: output tokens, seconds, mean accepted length; the
table gives, per method, the first and last quarter of each domain (tokens/s, ratio to
plain, MAL); the PNG plots rolling MAL and tokens/s against the request index.

    python benchmarks/adaptive_stream.py --model smollm2-135m --per-domain 100 --interleave
    python benchmarks/adaptive_stream.py --model qwen2.5-coder-1.5b --quantization w4a8-all \
        --domains sql,extraction --per-domain 120,40 --think 15 --interleave --state st --out sql_stream
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "spec_bench" / "question.jsonl"
METHODS = ("plain", "static", "learner", "adaptive", "static+suffix")


def stream(path: Path, domains: list[str], per_domain: list[int], distinct: int | None, seed: int,
           exclude_seed: int | None) -> list[tuple[str, list[dict]]]:
    """(domain, conversation) in order: generated domains from `stream_prompts`, else Spec-Bench
    categories of `path`."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import stream_prompts

    rows = None
    out = []
    for d, count in zip(domains, per_domain):
        if d in stream_prompts.DOMAINS:
            avoid = {c[-1]["content"] for c in stream_prompts.prompts(d, 1000, exclude_seed)} \
                if exclude_seed is not None else None
            convs = stream_prompts.prompts(d, distinct or count, seed, avoid)
        else:
            rows = rows or [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            convs = [[{"role": "user", "content": r["turns"][0]}] for r in rows if r["category"] == d][:distinct]
            if not convs:
                sys.exit(f"error: no questions of category {d!r} in {path} (generated domains: "
                         f"{', '.join(stream_prompts.DOMAINS)})")
        out += [(d, convs[i % len(convs)]) for i in range(count)]
    return out


def configs(args, llm_name: str) -> dict[str, dict | None]:
    from draftwise.speculators.adaptive import shipped_head_for

    head = shipped_head_for(llm_name)
    static = json.loads(args.static) if args.static else (
        {"method": "eagle", "model": head, "num_speculative_tokens": args.k} if head else {"method": "ngram"})
    # without think time no idle training: the other methods' engines run in this process
    # between this one's requests; with it, training only in the gaps (the bench holds it otherwise)
    learner = {"init": head if head else None, "train_threads": 1, "train_when_idle": args.think > 0,
               "train_share": 0.0 if args.think > 0 else args.train_share, **json.loads(args.learner)}
    adaptive = {"method": "adaptive", "num_speculative_tokens": args.k, "static": static, "learner": learner}
    state = {"adaptive_state": args.state} if args.state else {}  # adaptive's own: the others learn apart
    return {"plain": None, "static": {**static, "num_speculative_tokens": static.get("num_speculative_tokens", args.k)},
            "learner": {**adaptive, "parts": ["learner"]}, "adaptive": {**adaptive, **state},
            "static+suffix": {**adaptive, "parts": ["static", "suffix"]}}


def quarter_table(records: list[dict], domains: list[str], methods: list[str]) -> list[str]:
    lines = ["| method | " + " | ".join(f"{d} {q}" for d in domains for q in ("first 1/4", "last 1/4")) + " |",
             "|---|" + "---:|" * (2 * len(domains))]

    def quarters(m: str):
        for d in domains:
            rs = [r for r in records if r["method"] == m and r["domain"] == d]
            n = max(1, len(rs) // 4)
            for which, part in (("first", rs[:n]), ("last", rs[-n:])):
                toks, secs = sum(r["tokens"] for r in part), sum(r["seconds"] for r in part)
                yield (d, which), toks / secs if secs else 0.0, sum(r["mal"] * r["tokens"] for r in part) / max(1, toks)

    plain_rate = {key: rate for key, rate, _ in quarters("plain")} if "plain" in methods else {}
    for m in methods:
        cells = [f"{rate:.1f} (" + (f"{rate / plain_rate[key]:.2f}x, " if plain_rate.get(key) else "")
                 + f"MAL {mal:.2f})" for key, rate, mal in quarters(m)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def plot(records: list[dict], methods: list[str], out: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for m in methods:
        rs = sorted((r for r in records if r["method"] == m), key=lambda r: r["index"])
        xs, mal, tps = [], [], []
        for i in range(len(rs)):
            part = rs[max(0, i - window + 1): i + 1]
            toks, secs = sum(r["tokens"] for r in part), sum(r["seconds"] for r in part)
            xs.append(rs[i]["index"])
            mal.append(sum(r["mal"] * r["tokens"] for r in part) / max(1, toks))
            tps.append(toks / secs if secs else 0.0)
        axes[0].plot(xs, mal, label=m)
        axes[1].plot(xs, tps, label=m)
    axes[0].set_ylabel(f"mean accepted length (rolling {window})")
    axes[1].set_ylabel(f"tokens/s (rolling {window})")
    axes[1].set_xlabel("request index in the stream")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else 0.0


def latency_table(records: list[dict], domains: list[str], methods: list[str]) -> list[str]:
    """p50 / p95 of each request's latency (arrival to last token) and time to first token."""
    lines = ["| method | " + " | ".join(f"{d} latency p50 / p95 s | {d} TTFT p50 / p95 ms" for d in domains) + " |",
             "|---|" + "---:|" * (2 * len(domains))]
    for m in methods:
        cells = []
        for d in domains:
            rs = [r for r in records if r["method"] == m and r["domain"] == d]
            lat, ttft = [r["seconds"] for r in rs], [1000 * r["ttft"] for r in rs if r.get("ttft") is not None]
            cells += [f"{pct(lat, .5):.2f} / {pct(lat, .95):.2f}", f"{pct(ttft, .5):.0f} / {pct(ttft, .95):.0f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def block_table(records: list[dict], methods: list[str], block: int) -> list[str]:
    """Tokens/s over each `block` requests of the stream, and each method's ratio to the static part alone."""
    lines = ["| requests | domain | " + " | ".join(methods) + " |", "|---|---|" + "---:|" * len(methods)]
    spans = []  # (first index, last index + 1, domain): blocks start again at each domain
    for r in sorted((r for r in records if r["method"] == methods[0]), key=lambda r: r["index"]):
        if spans and spans[-1][2] == r["domain"] and r["index"] - spans[-1][0] < block:
            spans[-1][1] = r["index"] + 1
        else:
            spans.append([r["index"], r["index"] + 1, r["domain"]])
    for lo, hi, dom in spans:
        rate, mal = {}, {}
        for m in methods:
            part = [r for r in records if r["method"] == m and lo <= r["index"] < hi]
            toks, secs = sum(r["tokens"] for r in part), sum(r["seconds"] for r in part)
            rate[m] = toks / secs if secs else 0.0
            mal[m] = sum(r["mal"] * r["tokens"] for r in part) / max(1, toks)
        ref = rate.get("static") or 0.0
        cells = [f"{rate[m]:.1f}" + (f" ({rate[m] / ref:.2f}x)" if ref else "") + f", MAL {mal[m]:.2f}"
                 for m in methods]
        lines.append(f"| {lo}-{hi - 1} | {dom} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--domains", default="math_reasoning,summarization",
                    help="comma-separated: Spec-Bench categories or generated domains (sql, extraction)")
    ap.add_argument("--per-domain", default="100", help="requests of each domain: one number, or one per domain")
    ap.add_argument("--distinct", type=int, default=None,
                    help="cycle through the first N questions of each domain (repetitive traffic)")
    ap.add_argument("--seed", type=int, default=0, help="generated domains: the prompts' seed")
    ap.add_argument("--exclude-seed", type=int, default=None,
                    help="generated domains: leave out every prompt the stream of this seed could have had")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--k", type=int, default=8, help="num_speculative_tokens")
    ap.add_argument("--think", type=float, default=0.0,
                    help="seconds of idle after each request (the user reading); adaptive learns only then")
    ap.add_argument("--train-share", type=float, default=0.1, help="learner.train_share (without --think)")
    ap.add_argument("--learner", default="{}", help="JSON: more learner settings")
    ap.add_argument("--static", default=None, help="JSON speculative config of the static part")
    ap.add_argument("--state", default=None, help="adaptive's adaptive_state folder (kept for `train adaptive`)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--interleave", action="store_true")
    ap.add_argument("--resume", action="store_true", help="go on from OUT/records.jsonl of a run cut short")
    ap.add_argument("--window", type=int, default=20, help="rolling window of the plot, requests")
    ap.add_argument("--block", type=int, default=25, help="requests per row of the block table")
    ap.add_argument("--out", default="adaptive_stream")
    args = ap.parse_args()

    from tqdm import tqdm

    from draftwise.api import LLM
    from draftwise.sampling import SamplingParams

    domains = args.domains.split(",")
    counts = [int(x) for x in str(args.per_domain).split(",")]
    counts = counts * len(domains) if len(counts) == 1 else counts
    if len(counts) != len(domains):
        sys.exit(f"error: --per-domain gives {len(counts)} counts for {len(domains)} domains")
    methods = [m for m in args.methods.split(",") if m]
    if unknown := [m for m in methods if m not in METHODS]:
        sys.exit(f"error: unknown methods {unknown}; choose from {', '.join(METHODS)}")
    # with think time the learning method takes each request right after the gap
    run_order = sorted(methods, key=lambda m: m != "adaptive") if args.think > 0 else methods
    reqs = stream(Path(args.data), domains, counts, args.distinct, args.seed, args.exclude_seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec_path = out / "records.jsonl"
    records = [json.loads(line) for line in rec_path.read_text().splitlines() if line.strip()] \
        if args.resume and rec_path.exists() else []
    done = {r["index"] for r in records if r["method"] == run_order[-1]}
    records = [r for r in records if r["index"] in done]
    rec_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    base = LLM(args.model, dtype=args.dtype, quantization=args.quantization, max_batch_size=args.concurrency,
               progress=False)
    cfgs = configs(args, args.model)
    llms = {m: base.with_speculation(cfgs[m]) for m in methods}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    chunks = [list(range(i, min(i + args.concurrency, len(reqs)))) for i in range(0, len(reqs), args.concurrency)]
    chunks = [c for c in chunks if not set(c) <= done]
    order = [(c, m) for c in range(len(chunks)) for m in run_order] if args.interleave else \
        [(c, m) for m in run_order for c in range(len(chunks))]
    if done:
        print(f"resuming: {len(done)} requests done, {len(reqs) - len(done)} to go")
    learning = [m for m in methods if m in ("adaptive", "learner")]
    outputs = {}
    for r in records:
        outputs.setdefault(r["index"], {})[r["method"]] = r["token_ids"]
    with rec_path.open("a") as rec_file:
        for step, (c, m) in enumerate(tqdm(order, desc="stream", unit="batch")):
            idx = chunks[c]
            for other in methods:  # nothing runs in the background on this method's clock
                if other != m:
                    llms[other].pause_background()
            llms[m].resume_background()
            convs = [reqs[i][1] for i in idx]
            first: dict[str, float] = {}
            start = time.perf_counter()

            def on_output(o, first=first, start=start):
                if o.new_token_ids and o.request.request_id not in first:
                    first[o.request.request_id] = time.perf_counter() - start

            res = llms[m].chat(convs, params, on_output=on_output)
            secs = time.perf_counter() - start
            total = sum(len(r.token_ids) for r in res)
            for i, r in zip(idx, res):
                share = secs * len(r.token_ids) / max(1, total)
                rec = {"method": m, "index": i, "domain": reqs[i][0], "tokens": len(r.token_ids),
                       "seconds": share if args.concurrency > 1 else secs, "ttft": first.get(r.request_id),
                       "mal": r.stats["mean_accepted_length"], "drafted_by": r.stats.get("drafted_by", {}),
                       "token_ids": list(r.token_ids)}
                records.append(rec)
                rec_file.write(json.dumps(rec) + "\n")
                outputs.setdefault(i, {})[m] = r.token_ids
            rec_file.flush()
            last_of_request = not args.interleave or step + 1 == len(order) or order[step + 1][0] != c
            if args.think > 0 and last_of_request:  # the user reads; only the learners work
                for other in methods:
                    if other in learning:
                        llms[other].resume_background()
                    else:
                        llms[other].pause_background()
                time.sleep(args.think)
    reports = {m: llms[m].engine.proposer.report() for m in methods if llms[m].engine.proposer is not None}
    for m in methods:
        llms[m].close()
    differ = sum(1 for o in outputs.values() if len({tuple(v) for v in o.values()}) > 1)
    (out / "reports.json").write_text(json.dumps(reports, indent=2))
    plot(records, methods, out / "stream.png", args.window)
    from structured import cpu_name

    head = (f"{cpu_name()} ({os.cpu_count()} cores), {date.today()}, {args.model} {args.dtype} "
            f"{args.quantization}, {len(reqs)} requests ({' then '.join(f'{n} {d}' for d, n in zip(domains, counts))}; "
            f"distinct per domain: {args.distinct or 'all'}, seed {args.seed}), concurrency {args.concurrency}, "
            f"max_tokens {args.max_tokens}, think {args.think:g} s, interleaved: {args.interleave}"
            + (f", resumed after {len(done)}" if done else ""))
    text = "\n".join([head, f"outputs differing from plain: {differ} of {len(outputs)}", "",
                      *quarter_table(records, domains, methods), "", *latency_table(records, domains, methods), "",
                      *block_table(records, methods, args.block), ""])
    (out / "table.md").write_text(text)
    print(text)
    print(json.dumps(reports, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
