"""Grammar engines side by side: allowed-token mask time per token and compile time.

The numbers behind the choice of llguidance (docs/structured.md): on a bundled model's
vocabulary (Qwen2.5's 151,936 tokens by default), a JSON schema compiled with no cache,
then a walk along a valid answer of it, the allowed-token mask computed before each token.
xgrammar is measured too when it is installed (`pip install xgrammar`; not a dependency).

    python benchmarks/grammar_engines.py --model qwen2.5-coder-1.5b
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"},
                   "skills": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "city", "skills"], "additionalProperties": False,
}
ANSWER = {"name": "Maria Lopez", "age": 34, "city": "Madrid", "skills": ["Python", "SQL", "Rust"]}


def llguidance_run(tok, vocab_size: int, eos: list[int], ids: list[int], rounds: int) -> tuple[list[float], list[float]]:
    import llguidance
    import llguidance.torch
    import torch

    from draftwise.constraints.compile import ll_tokenizer
    from draftwise.constraints.spec import JSON_LAYOUT

    lltok = ll_tokenizer(tok, vocab_size, eos)
    text = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), dict(JSON_LAYOUT))
    compiles, masks = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        m = llguidance.LLMatcher(lltok, text, log_level=0)
        compiles.append(time.perf_counter() - start)
        mask = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)
        for t in ids:
            start = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(m, mask, 0)
            masks.append(time.perf_counter() - start)
            assert m.consume_token(t), m.get_error()
    return compiles, masks


def xgrammar_run(tok, vocab_size: int, ids: list[int], rounds: int) -> tuple[list[float], list[float]] | None:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    compiles, masks = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "))
        compiles.append(time.perf_counter() - start)
        m = xgr.GrammarMatcher(compiled)
        mask = xgr.allocate_token_bitmask(1, vocab_size)
        for t in ids:
            start = time.perf_counter()
            m.fill_next_token_bitmask(mask)
            masks.append(time.perf_counter() - start)
            assert m.accept_token(t)
    return compiles, masks


def cpu_name() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from structured import cpu_name as name

    return name()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b", help="whose tokenizer (a bundled name or folder)")
    p.add_argument("--rounds", type=int, default=20, help="compiles and walks per engine (default 20)")
    args = p.parse_args(argv)

    from draftwise.models.loading import load_weights

    weights = load_weights(args.model, progress=True)
    tok, config = weights.tokenizer, weights.config
    ids = tok.encode(json.dumps(ANSWER), add_special_tokens=False)
    rows = [("llguidance", llguidance_run(tok, config.vocab_size, list(config.eos_token_ids), ids, args.rounds))]
    xg = xgrammar_run(tok, config.vocab_size, ids, args.rounds)
    if xg is not None:
        rows.append(("xgrammar", xg))
    print(f"Grammar engines, {date.today()}, {cpu_name()}, {args.model} vocabulary ({config.vocab_size} tokens), "
          f"a {len(SCHEMA['properties'])}-field JSON schema, {len(ids)}-token answer, {args.rounds} rounds")
    print("| engine | mask median | mask mean | compile median |\n|---|---:|---:|---:|")
    for name, (compiles, masks) in rows:
        print(f"| {name} | {statistics.median(masks) * 1e6:.0f} us | {statistics.mean(masks) * 1e6:.0f} us | "
              f"{statistics.median(compiles) * 1e3:.1f} ms |")
    if xg is None:
        print("(xgrammar is not installed: pip install xgrammar to compare)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
