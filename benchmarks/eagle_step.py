"""One EAGLE step, taken apart: what drafting costs against one target pass.

Generates greedily with `--speculator eagle` (fixed node budget) and times, per step:
the target's verifying pass, the whole draft (`propose`), and inside it the head's
catch-up on newly committed tokens, its tree passes (one per depth), the LM head over the
draft vocabulary with its top-k, and the rest (tree bookkeeping and masks in Python).
The head runs twice, interleaved prompt by prompt: on the target's kernels (what
draftwise does, `with_kernels`) and as plain `nn.Linear` layers (before). A plain
decoding pass is timed in the same run for scale.

    python benchmarks/eagle_step.py --model qwen2.5-coder-1.5b --head qwen2.5-coder-1.5b-eagle --quantization w4a8-all
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections import defaultdict

import torch

from draftwise.api import LLM
from draftwise.models.build import load_model
from draftwise.sampling import SamplingParams
from draftwise.speculators.eagle import EagleHead, load_eagle_head
from draftwise.speculators.eagle import proposer as eagle_proposer  # where the proposer looks up with_kernels

PROMPTS = [
    "Explain how a hash map handles collisions, with a short Python example.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What is the difference between a process and a thread? Answer in a few paragraphs.",
    "Give me a recipe for a simple tomato soup, step by step.",
]


def timed(times: dict[str, list[float]], name: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        times[name].append(time.perf_counter() - t0)
        return out
    return wrapper


def instrument(llm: LLM, times: dict[str, list[float]]) -> None:
    """Wrap the engine's pass and the proposer's phases with timers."""
    import draftwise.engine.engine as engine_mod

    prop = llm.engine.proposer
    for name in ("propose", "_catch_up", "_run_frontier", "_logprobs"):
        setattr(prop, name, timed(times, name, getattr(prop, name)))
    if not hasattr(engine_mod.target_step, "__wrapped_timer__"):
        original = engine_mod.target_step

        def target_step(*args, **kwargs):
            return timed(TIMES_TARGET, "target_pass", original)(*args, **kwargs)
        target_step.__wrapped_timer__ = True
        engine_mod.target_step = target_step


TIMES_TARGET: dict[str, list[float]] = defaultdict(list)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--head", default="qwen2.5-coder-1.5b-eagle")
    ap.add_argument("--quantization", default="w4a8-all")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--nodes", type=int, default=12, help="tree nodes verified per step")
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()

    target, tok = load_model(args.model, args.dtype, "cpu", True, args.quantization)
    spec = {"method": "eagle", "model": args.head, "num_speculative_tokens": args.nodes, "adaptive": False,
            "eagle_tree_depth": args.depth, "eagle_tree_top_k": args.top_k}
    kernels = LLM.from_model(target, tok, speculative_config=spec, max_batch_size=1)
    plain_head: EagleHead = load_eagle_head(args.head, target)
    real = eagle_proposer.with_kernels
    eagle_proposer.with_kernels = lambda head, quantization="none": head  # the head as nn.Linear layers
    before = LLM.from_model(target, tok, speculative_config=spec, max_batch_size=1, draft_model=plain_head)
    eagle_proposer.with_kernels = real
    plain = LLM.from_model(target, tok, max_batch_size=1)
    runs = {"kernels": kernels, "nn.Linear": before}
    times = {name: defaultdict(list) for name in runs}
    for name, llm in runs.items():
        instrument(llm, times[name])
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens)
    chat = [[{"role": "user", "content": p}] for p in PROMPTS]
    plain.chat(chat[:1], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
    for llm in runs.values():
        llm.chat(chat[:1], SamplingParams(temperature=0.0, max_tokens=8))
    for t in times.values():
        t.clear()
    plain_pass, mal = [], defaultdict(list)
    for messages in chat:  # interleaved: each prompt with every setting before the next prompt
        TIMES_TARGET.clear()
        plain.chat([messages], params)
        plain_pass += TIMES_TARGET["target_pass"]
        for name, llm in runs.items():
            TIMES_TARGET.clear()
            out = llm.chat([messages], params)[0]
            times[name]["target_pass"] += TIMES_TARGET["target_pass"]
            mal[name].append(out.stats["mean_accepted_length"])

    def ms(xs: list[float]) -> float:
        return 1000 * statistics.median(xs) if xs else 0.0

    print(f"# One EAGLE step on {args.model} ({args.dtype}, quantization {args.quantization}), head {args.head}")
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; tree: {args.nodes} nodes, depth {args.depth}, top-k {args.top_k}; "
          f"{len(PROMPTS)} chat prompts x {args.tokens} tokens; medians per step\n")
    print(f"plain decoding, one-token pass: {ms(plain_pass):.1f} ms\n")
    print("| head | verify pass | draft (all) | catch-up | tree pass x depth | LM head + top-k x calls "
          "| rest (Python) | draft / one-token pass | mean accepted length |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, t in times.items():
        steps = max(1, len(t["propose"]))
        frontier = sum(t["_run_frontier"]) / steps
        lm = sum(t["_logprobs"]) / steps
        catch = sum(t["_catch_up"]) / steps
        total = sum(t["propose"]) / steps
        rest = total - frontier - lm - catch
        print(f"| {name} | {ms(t['target_pass']):.1f} ms | {1000 * total:.1f} ms | {1000 * catch:.1f} ms | "
              f"{1000 * frontier:.1f} ms ({ms(t['_run_frontier']):.2f} each) | {1000 * lm:.1f} ms | "
              f"{1000 * rest:.1f} ms | {total / (statistics.median(plain_pass)):.2f} | "
              f"{statistics.mean(mal[name]):.2f} |")


if __name__ == "__main__":
    main()
