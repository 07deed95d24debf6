"""`draftwise bench`: Spec-Bench style speed benchmark of speculators against plain decoding."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from draftwise.commands.generate import DEFAULT_MODEL, add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure speculators against plain decoding on a prompt set (Spec-Bench protocol)",
        description="Run plain decoding and each --speculator over a Spec-Bench style JSONL prompt set on the same "
                    "loaded target (greedy, batch 1, chat template, warm-up first) and report tokens/s, speedup, "
                    "mean accepted length, acceptance per position, target passes per token, draft time share "
                    "and the exact-match rate against plain decoding, per category and overall. Writes "
                    "results.json, results.md, PNG plots and records.jsonl (a rerun resumes from it).",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"bundled name, .gguf file or HF folder (default {DEFAULT_MODEL})")
    p.add_argument("--roofline", action="store_true",
                   help="instead: print the roofline of the loaded model on this machine (weight bytes, memory "
                        "bandwidth, floor per token, measured pass time over 1-16 tokens, best draft length)")
    p.add_argument("--quality", action="store_true",
                   help="instead: measure what quantization costs: perplexity on a fixed text and next-token "
                        "agreement with the unquantized model, for --quantization (default: every setting)")
    p.add_argument("--text", metavar="FILE", default=None,
                   help="text scored by --quality (default: a short Python module with prose, shipped)")
    p.add_argument("--speculator", action="append", default=[], metavar="SPEC",
                   help='method name or JSON config, repeatable: ngram, suffix, '
                        '\'{"method": "draft_model", "model": "qwen2.5-coder-0.5b"}\'')
    p.add_argument("--dataset", metavar="FILE.jsonl",
                   help='one {"question_id", "category", "turns"} object a line (Spec-Bench question.jsonl)')
    p.add_argument("--categories", default=None, help="comma-separated categories (e.g. mt_bench,translation,coding)")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each category")
    p.add_argument("--max-tokens", type=int, default=1024, help="new tokens per turn at most (default 1024, as Spec-Bench)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default, as Spec-Bench)")
    p.add_argument("--sampling", default="coupled", choices=["coupled", "rejection"],
                   help="with --temperature > 0: coupled (default; seeded tokens equal plain decoding's) or "
                        "rejection (classic speculative sampling, the same distribution only)")
    p.add_argument("--no-chat-template", action="store_true", help="send the raw question text instead")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up generation before each method")
    p.add_argument("--out", default="bench-results", help="output folder (default bench-results); reruns resume")
    p.add_argument("--peers", nargs="+", default=[], metavar="PEER",
                   help="also run other engines on the same model: hf, hf-assisted, hf-lookup, llamacpp, "
                        "llamacpp-lookup (comma or space separated)")
    p.add_argument("--interleave", action="store_true",
                   help="run every method on one question before the next (default: one method over all "
                        "questions, then the next); on a machine whose speed drifts, all methods see the same drift")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from draftwise.api import LLM
    from draftwise.bench import BenchSettings, load_questions, parse_methods, run_bench
    from draftwise.errors import BadInput
    from draftwise.models.build import default_device

    if not (args.roofline or args.quality or args.no_plots) and importlib.util.find_spec("matplotlib") is None:
        raise BadInput("the benchmark's plots need matplotlib: pip install 'draftwise[bench]' (or pass --no-plots)")
    if args.roofline:
        from draftwise.bench.roofline import measure, report
        from draftwise.models.build import load_model

        model, _ = load_model(args.model, args.dtype, args.device, not args.quiet, args.quantization)
        print(report(measure(model), args.model, args.dtype, args.quantization))
        return 0
    if args.quality:
        return run_quality(args)
    if not args.speculator or not args.dataset:
        raise BadInput("bench needs --dataset and at least one --speculator (or --roofline, or --quality)")
    if args.max_tokens < 1:
        raise BadInput("--max-tokens must be at least 1")
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    peers = [x.strip() for item in args.peers for x in item.split(",") if x.strip()]
    questions = load_questions(args.dataset, categories, args.limit)
    methods = parse_methods(args.speculator, peers)
    settings = BenchSettings(
        model=args.model, dtype=args.dtype, device=args.device or default_device(), max_tokens=args.max_tokens,
        temperature=args.temperature, sampling=args.sampling, chat_template=not args.no_chat_template, warmup=not args.no_warmup,
        dataset=str(args.dataset), categories=categories, limit=args.limit, quantization=args.quantization,
    )
    llm = LLM(args.model, dtype=args.dtype, device=settings.device, max_batch_size=1,
              max_model_len=args.max_model_len, progress=not args.quiet, quantization=args.quantization,
              revision=args.revision)
    data = run_bench(llm, questions, methods, args.out, settings, progress=not args.quiet, plots=not args.no_plots,
                     interleave=args.interleave)
    print((Path(args.out) / "results.md").read_text())
    print(f"results: {args.out}/results.json, {args.out}/results.md", file=sys.stderr)
    lossless = data["lossless"]
    return 1 if lossless["greedy"] and not lossless["ok"] else 0


def run_quality(args: argparse.Namespace) -> int:
    from draftwise.bench.quality import measure, read_text, report
    from draftwise.errors import BadInput
    from draftwise.models.build import load_model
    from draftwise.models.quantize import QUANTIZATIONS

    text = read_text(args.text)
    methods = list(QUANTIZATIONS) if args.quantization == "none" else [args.quantization]
    reference, tokenizer = load_model(args.model, args.dtype, args.device, not args.quiet)
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise BadInput("the text must be at least two tokens long")

    def load(method: str):
        return reference if method == "none" else load_model(args.model, args.dtype, args.device, False, method)[0]

    print(report(measure(load, methods, ids), args.model, args.dtype, len(ids)))
    return 0
