"""Replay a stream of requests in order and watch the adaptive speculator learn.

The stream is `--per-domain` questions of each of `--domains` (Spec-Bench categories, in
that order: the second domain is the shift). Methods, side by side on one loaded target:

- plain: no speculation;
- static: the static part alone (`--static`, default: the shipped EAGLE head of the model
  when there is one, else ngram);
- learner: the adaptive speculator with only its learned head drafting (it learns from
  the stream as adaptive does);
- adaptive: static + learner + suffix under the controller.

`--interleave` runs every method on request i before any method moves to request i+1, so
slow drift of the machine hits all of them alike. At `--concurrency` c, c requests of the
stream run as one batch. Per request: output tokens, seconds, mean accepted length; the
table gives, per method, the first and last quarter of each domain (tokens/s, ratio to
plain, MAL); the PNG plots rolling MAL and tokens/s against the request index.

    python benchmarks/adaptive_stream.py --model smollm2-135m --per-domain 100 --interleave
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "spec_bench" / "question.jsonl"
METHODS = ("plain", "static", "learner", "adaptive", "static+suffix")


def stream(path: Path, domains: list[str], per_domain: int, distinct: int | None) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = []
    for d in domains:
        qs = [r["turns"][0] for r in rows if r["category"] == d][:distinct]
        if not qs:
            sys.exit(f"error: no questions of category {d!r} in {path}")
        out += [(d, qs[i % len(qs)]) for i in range(per_domain)]
    return out


def configs(args, llm_name: str) -> dict[str, dict | None]:
    from draftwise.speculators.adaptive import shipped_head_for

    head = shipped_head_for(llm_name)
    static = json.loads(args.static) if args.static else (
        {"method": "eagle", "model": head, "num_speculative_tokens": args.k} if head else {"method": "ngram"})
    # no idle training: the other methods' engines run in this process between this one's requests
    learner = {"init": head if head else None, "train_threads": 1, "train_when_idle": False,
               "train_share": args.train_share, **json.loads(args.learner)}
    adaptive = {"method": "adaptive", "num_speculative_tokens": args.k, "static": static, "learner": learner}
    return {"plain": None, "static": {**static, "num_speculative_tokens": static.get("num_speculative_tokens", args.k)},
            "learner": {**adaptive, "parts": ["learner"]}, "adaptive": adaptive,
            "static+suffix": {**adaptive, "parts": ["static", "suffix"]}}


def quarter_table(records: list[dict], domains: list[str], methods: list[str]) -> list[str]:
    lines = ["| method | " + " | ".join(f"{d} {q}" for d in domains for q in ("first 1/4", "last 1/4")) + " |",
             "|---|" + "---:|" * (2 * len(domains))]
    plain_rate = {}
    for m in methods:
        cells = []
        for d in domains:
            rs = [r for r in records if r["method"] == m and r["domain"] == d]
            n = max(1, len(rs) // 4)
            for which, part in (("first", rs[:n]), ("last", rs[-n:])):
                toks, secs = sum(r["tokens"] for r in part), sum(r["seconds"] for r in part)
                rate = toks / secs if secs else 0.0
                key = (d, which)
                if m == "plain":
                    plain_rate[key] = rate
                ratio = rate / plain_rate[key] if plain_rate.get(key) else 0.0
                mal = sum(r["mal"] * r["tokens"] for r in part) / max(1, toks)
                cells.append(f"{rate:.1f} ({ratio:.2f}x, MAL {mal:.2f})")
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--domains", default="math_reasoning,summarization")
    ap.add_argument("--per-domain", type=int, default=100)
    ap.add_argument("--distinct", type=int, default=None,
                    help="cycle through the first N questions of each domain (repetitive traffic)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--k", type=int, default=8, help="num_speculative_tokens")
    ap.add_argument("--train-share", type=float, default=0.1, help="learner.train_share")
    ap.add_argument("--learner", default="{}", help="JSON: more learner settings")
    ap.add_argument("--static", default=None, help="JSON speculative config of the static part")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--interleave", action="store_true")
    ap.add_argument("--window", type=int, default=20, help="rolling window of the plot, requests")
    ap.add_argument("--out", default="adaptive_stream")
    args = ap.parse_args()

    from tqdm import tqdm

    from draftwise.api import LLM
    from draftwise.sampling import SamplingParams

    domains = args.domains.split(",")
    methods = [m for m in args.methods.split(",") if m]
    if unknown := [m for m in methods if m not in METHODS]:
        sys.exit(f"error: unknown methods {unknown}; choose from {', '.join(METHODS)}")
    reqs = stream(Path(args.data), domains, args.per_domain, args.distinct)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = LLM(args.model, dtype=args.dtype, quantization=args.quantization, max_batch_size=args.concurrency,
               progress=False)
    cfgs = configs(args, args.model)
    llms = {m: base.with_speculation(cfgs[m]) for m in methods}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    chunks = [list(range(i, min(i + args.concurrency, len(reqs)))) for i in range(0, len(reqs), args.concurrency)]
    order = [(c, m) for c in range(len(chunks)) for m in methods] if args.interleave else \
        [(c, m) for m in methods for c in range(len(chunks))]
    records, outputs = [], {}
    for c, m in tqdm(order, desc="stream", unit="batch"):
        idx = chunks[c]
        convs = [[{"role": "user", "content": reqs[i][1]}] for i in idx]
        start = time.perf_counter()
        res = llms[m].chat(convs, params)
        secs = time.perf_counter() - start
        total = sum(len(r.token_ids) for r in res)
        for i, r in zip(idx, res):
            share = secs * len(r.token_ids) / max(1, total)
            records.append({"method": m, "index": i, "domain": reqs[i][0], "tokens": len(r.token_ids),
                            "seconds": share, "mal": r.stats["mean_accepted_length"],
                            "drafted_by": r.stats.get("drafted_by", {})})
            outputs.setdefault(i, {})[m] = r.token_ids
    for m in methods:
        llms[m].close()
    differ = sum(1 for o in outputs.values() if len({tuple(v) for v in o.values()}) > 1)
    reports = {m: llms[m].engine.proposer.report() for m in methods if llms[m].engine.proposer is not None}
    (out / "records.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (out / "reports.json").write_text(json.dumps(reports, indent=2))
    plot(records, methods, out / "stream.png", args.window)
    head = (f"{platform.processor() or platform.machine()}, {date.today()}, {args.model} {args.dtype} "
            f"{args.quantization}, {len(reqs)} requests ({' then '.join(domains)}; distinct per domain: "
            f"{args.distinct or 'all'}), concurrency "
            f"{args.concurrency}, max_tokens {args.max_tokens}, interleaved: {args.interleave}")
    table = quarter_table(records, domains, methods)
    text = "\n".join([head, f"outputs differing from plain: {differ} of {len(outputs)}", "", *table, ""])
    (out / "table.md").write_text(text)
    print(text)
    print(json.dumps(reports, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
