"""How long a request waits when it arrives while the adaptive learner trains in idle time.

On a CPU of 4 cores or fewer the learner trains only while no request runs (after a
second without an engine step). A request that arrives in the middle of a training step
does not wait for the step to end: the engine starts at once, but shares the cores with
the step's remainder. This measures what that costs the request: its time to first token
(and to its last) when it arrives during a training step, against the same request with
the learner held (`LLM.pause_background`), alternating, one loaded target. The trainer
thread runs at the lowest CPU priority (`lower_this_thread`, speculators/adaptive/online.py);
`--normal-priority` measures it without.

    python benchmarks/adaptive_idle_wait.py --model qwen2.5-coder-1.5b --quantization w4a8-all
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

FILL = ["Write a Python function that parses a date in ISO format.",
        "Explain what a hash map is in three sentences.",
        "Write a SQL query that counts orders per customer.",
        "List five uses of a Raspberry Pi."]
ASK = ["What is the capital of Portugal?", "Name three sorting algorithms.", "What does HTTP stand for?",
       "Give one synonym of 'quick'."]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--quantization", default="w4a8-all")
    p.add_argument("--trials", type=int, default=8, help="requests of each kind (default 8)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--normal-priority", action="store_true",
                   help="leave the trainer thread at normal priority (the behaviour before it was lowered)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="windows per forward/backward of a step (default: the learner's, the whole batch)")
    p.add_argument("--verbose", action="store_true", help="one line per trial on stderr")
    args = p.parse_args(argv)

    from structured import cpu_name

    from draftwise.api import LLM
    from draftwise.sampling import SamplingParams
    from draftwise.speculators.adaptive import OnlineLearner

    steps: list[tuple[float, float]] = []
    real_step = OnlineLearner.train_step

    def timed_step(self):
        start = time.perf_counter()
        try:
            return real_step(self)
        finally:
            steps.append((start, time.perf_counter()))

    OnlineLearner.train_step = timed_step
    if args.normal_priority:
        import draftwise.speculators.adaptive.online as online  # where the learner looks it up

        online.lower_this_thread = lambda: False
    llm = LLM(args.model, quantization=args.quantization, speculative_config={"method": "adaptive"})
    learner = llm.engine.proposer.learner
    if args.micro_batch is not None:
        learner.settings.micro_batch = args.micro_batch
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate([llm.chat_prompt([{"role": "user", "content": q}]) for q in FILL],
                 SamplingParams(temperature=0.0, max_tokens=96))
    deadline = time.monotonic() + 120
    while len(steps) < 2 and time.monotonic() < deadline:  # idle: it trains; learn a step's length
        time.sleep(0.1)
    if len(steps) < 2:
        print(f"the learner did not train in 2 minutes of idle time (error: {learner.error})", file=sys.stderr)
        return 1
    step_s = statistics.median(b - a for a, b in steps)

    def ask(i: int) -> tuple[float, float]:
        first: list[float] = []
        start = time.perf_counter()
        llm.generate([llm.chat_prompt([{"role": "user", "content": ASK[i % len(ASK)]}])], params,
                     on_output=lambda o: first.append(time.perf_counter()) if not first else None)
        return first[0] - start, time.perf_counter() - start

    rng = random.Random(0)
    rows: dict[str, list[tuple[float, float]]] = {"held": [], "mid-step": []}
    in_flight: list[bool] = []  # per trial: a training step was running when the request arrived
    for i in range(args.trials):
        llm.pause_background()
        time.sleep(0.5)
        rows["held"].append(ask(i))
        llm.resume_background()
        n = len(steps)
        deadline = time.monotonic() + 60
        while not learner.busy and time.monotonic() < deadline:  # idle for a second: a step starts
            time.sleep(0.005)
        time.sleep(rng.uniform(0.1, 0.8) * step_s)  # somewhere inside the step
        busy, calls = learner.busy, len(steps)
        rows["mid-step"].append(ask(i))
        in_flight.append(busy)
        if args.verbose:
            print(f"trial {i}: step in flight {busy}, steps done since resuming {calls - n}, extra wait "
                  f"{(rows['mid-step'][-1][0] - rows['held'][-1][0]) * 1000:.0f} ms", file=sys.stderr)
    llm.close()

    def stat(values, q):
        return sorted(values)[min(len(values) - 1, int(q * len(values)))]

    held_ttft = [a for a, _ in rows["held"]]
    mid_ttft = [a for a, _ in rows["mid-step"]]
    print(f"Adaptive idle-time learning, a request arriving mid-step: {date.today()}, {cpu_name()}, {args.model} "
          f"{args.quantization}, trainer at {'normal' if args.normal_priority else 'lowest'} priority, "
          f"micro-batch {args.micro_batch or 'default'}, "
          f"{args.trials} requests of each kind, {args.max_tokens} tokens each; a training step "
          f"{step_s:.2f} s (median of {len(steps)})")
    print("| request | time to first token, median | p90 | whole request, median |\n|---|---:|---:|---:|")
    for label, rs in rows.items():
        first, whole = [a for a, _ in rs], [b for _, b in rs]
        print(f"| {label} | {statistics.median(first) * 1000:.0f} ms | {stat(first, 0.9) * 1000:.0f} ms | "
              f"{statistics.median(whole) * 1000:.0f} ms |")
    extra = [m - h for m, h in zip(mid_ttft, held_ttft)]
    for label, keep in (("arriving mid-step", True), ("arriving with no step in flight (the pairing's own noise)",
                                                      False)):
        xs = [e for e, f in zip(extra, in_flight) if f == keep]
        if xs:
            print(f"extra wait for the first token, {label}: {len(xs)} trials, median "
                  f"{statistics.median(xs) * 1000:.0f} ms, p90 {stat(xs, 0.9) * 1000:.0f} ms, "
                  f"most {max(xs) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
