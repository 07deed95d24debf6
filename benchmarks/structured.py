"""Structured output under speculation: valid rate, speed against plain constrained decoding.

Three kinds of traffic, every prompt made here from a fixed seed (nothing from a training
set), each request constrained:

- extract: a generated person record written as prose; the answer is JSON of a schema
  (name, age, city, email, skills), the schema given in the prompt as an API user would;
- answer: Spec-Bench questions (`../shared/data/spec_bench/`, from outside the project)
  answered as JSON {"answer", "confidence", "follow_up"};
- tool: a generated request that one of three tools serves, `tool_choice: "required"`
  (the tools rendered by the model's chat template, the call enforced by the grammar).

Methods, side by side on one loaded target: plain constrained decoding (no draft), then each
`--speculator`. `--interleave` (the default) runs every method on prompt i before prompt
i+1. Per method and task: valid rate (parses and validates against the schema), outputs
identical to plain, tokens/s and its ratio to plain, mean accepted length (tokens per target
pass), the forced-token share of the output, and the share of wall time spent on the
constraint (fitting drafts to the grammar, computing masks, masking logits).

A last check runs a batch of two with ngram: an unconstrained request beside another
unconstrained one, then beside a constrained one; it reports the unconstrained request's
time per target pass in both.

    python benchmarks/structured.py --model qwen2.5-coder-1.5b --quantization w4a8-all
    python benchmarks/structured.py --model smollm2-135m --quantization none --per-task 4

Records go to `--out` (one JSON line per request); a rerun with the same `--out` resumes.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC_BENCH = ROOT.parent / "shared" / "data" / "spec_bench" / "question.jsonl"

FIRST = ["Maria", "Tom", "Aiko", "Lucas", "Fatima", "Ivan", "Chloe", "Ravi", "Ana", "Kwame", "Sofia", "Jonas"]
LAST = ["Lopez", "Becker", "Tanaka", "Martin", "Haddad", "Petrov", "Dubois", "Sharma", "Silva", "Mensah"]
CITIES = ["Madrid", "Hamburg", "Osaka", "Lyon", "Casablanca", "Kazan", "Montreal", "Pune", "Porto", "Accra"]
SKILLS = ["Python", "SQL", "Rust", "Kubernetes", "Go", "React", "TypeScript", "Spark", "Terraform", "Java"]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 40},
        "email": {"type": "string", "maxLength": 60},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 6},
    },
    "required": ["name", "age", "city", "email", "skills"], "additionalProperties": False,
}
ANSWER = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 600},
                   "confidence": {"enum": ["low", "medium", "high"]},
                   "follow_up": {"type": "string", "maxLength": 120}},
    "required": ["answer", "confidence", "follow_up"], "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"enum": ["celsius", "fahrenheit"]}},
                       "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "search_products", "description": "Search the shop's catalogue",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"},
                                                        "max_price": {"type": "number"},
                                                        "category": {"enum": ["books", "electronics", "garden"]}},
                       "required": ["query", "max_price", "category"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "create_event", "description": "Put an event in the user's calendar",
        "parameters": {"type": "object", "properties": {"title": {"type": "string"},
                                                        "date": {"type": "string", "description": "YYYY-MM-DD"},
                                                        "attendees": {"type": "array", "items": {"type": "string"}}},
                       "required": ["title", "date", "attendees"], "additionalProperties": False}}},
]


def extract_prompts(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        first, last, city = rng.choice(FIRST), rng.choice(LAST), rng.choice(CITIES)
        age, skills = rng.randint(21, 70), rng.sample(SKILLS, rng.randint(2, 4))
        email = f"{first.lower()}.{last.lower()}@{rng.choice(['example.com', 'mail.org', 'corp.net'])}"
        text = (f"{first} {last} ({age}) moved to {city} last year and works with {', '.join(skills[:-1])} and "
                f"{skills[-1]}. Reach {first.split()[0]} at {email}.")
        content = (f"Extract the person's details from this text as JSON matching the schema.\n\n"
                   f"Schema: {json.dumps(PERSON)}\n\nText: {text}")
        out.append({"messages": [{"role": "user", "content": content}], "schema": PERSON})
    return out


def answer_prompts(n: int) -> list[dict]:
    rows = [json.loads(line) for line in SPEC_BENCH.read_text().splitlines() if line.strip()]
    qs = [r["turns"][0] for r in rows if r["category"] in ("qa", "math_reasoning")][:n]
    note = ("Answer in JSON with keys answer (a short answer), confidence (low, medium or high) and follow_up "
            "(one question the user might ask next).")
    return [{"messages": [{"role": "user", "content": f"{q}\n\n{note}"}], "schema": ANSWER} for q in qs]


def tool_prompts(rng: random.Random, n: int) -> list[dict]:
    asks = [
        lambda: f"What's the weather like in {rng.choice(CITIES)} right now? I prefer "
                f"{rng.choice(['celsius', 'fahrenheit'])}.",
        lambda: f"Find me {rng.choice(['a novel about sailing', 'wireless headphones', 'a garden hose'])} "
                f"under {rng.randint(10, 200)} dollars.",
        lambda: f"Schedule '{rng.choice(['Team sync', 'Dentist', 'Budget review'])}' on 2027-0{rng.randint(1, 9)}-"
                f"{rng.randint(10, 28)} with {rng.choice(FIRST)} and {rng.choice(FIRST)}.",
    ]
    return [{"messages": [{"role": "user", "content": asks[i % 3]()}], "tools": TOOLS} for i in range(n)]


def constraint_of(task: dict, tok):
    from draftwise.constraints import StructuredOutputsParams

    if "tools" in task:
        return tool_plan(task).constraint(tok)
    return StructuredOutputsParams(json=task["schema"])


def tool_plan(task: dict):
    """One call of one of the task's tools, enforced by the grammar (`tool_choice: "required"`)."""
    from draftwise.toolcalls import plan_tools

    return plan_tools(task["tools"], "required", parallel_tool_calls=False)


def validate(task: dict, text: str) -> bool:
    import jsonschema

    try:
        if "tools" in task:
            from draftwise.toolcalls import parse_tool_calls

            _, calls = parse_tool_calls(text, tool_plan(task))
            if len(calls) != 1:
                return False
            fn = next(t["function"] for t in task["tools"] if t["function"]["name"] == calls[0]["function"]["name"])
            jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), fn["parameters"])
        else:
            jsonschema.validate(json.loads(text), task["schema"])
        return True
    except (ValueError, StopIteration, jsonschema.ValidationError):
        return False


class ConstraintTimer:
    """Wall time spent on constraints: fitting drafts (masks of every draft row), the
    prefill's masks and masking the logits, accumulated across the engine's calls."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def installed(self):
        import draftwise.engine.engine as engine_module
        import draftwise.engine.step as step_module
        import draftwise.sampling as sampling_module
        from draftwise.constraints import Matcher

        saved = [(engine_module, "fit_batch"), (sampling_module, "apply_allowed"), (Matcher, "allowed_after")]
        originals = [getattr(o, n) for o, n in saved]

        def timed(fn):
            def run(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start
            return run

        for (owner, name), fn in zip(saved, originals):
            setattr(owner, name, timed(fn))
        assert step_module  # the prefill calls Matcher.allowed_after, timed above
        try:
            yield self
        finally:
            for (owner, name), fn in zip(saved, originals):
                setattr(owner, name, fn)


def cpu_name() -> str:
    """The CPU's model name and its widest vector extension (timings differ by far across them)."""
    from draftwise.bench.report import cpu_model

    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    wide = "AVX-512" if "avx512f" in flags else "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"
    return f"{cpu_model()} ({wide})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--quantization", default="w4a8-all")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--speculator", action="append", default=[], metavar="JSON|NAME",
                   help="a speculator to compare (repeatable); default: ngram, suffix, and the model's shipped "
                        "EAGLE head alone and with the ngram graft")
    p.add_argument("--per-task", type=int, default=6, help="prompts of each task (default 6)")
    p.add_argument("--tasks", default="extract,answer,tool")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--out", default="bench-structured", help="records folder; a rerun resumes")
    p.add_argument("--no-interleave", action="store_true", help="all prompts of one method before the next")
    args = p.parse_args(argv)

    import torch

    from draftwise.api import LLM
    from draftwise.models.build import load_model
    from draftwise.sampling import SamplingParams
    from draftwise.speculators.adaptive import shipped_head_for

    torch.manual_seed(0)
    model, tok = load_model(args.model, dtype=args.dtype, quantization=args.quantization)
    specs = [json.loads(s) if s.startswith("{") else {"method": s} for s in args.speculator]
    if not specs:
        specs = [{"method": "ngram"}, {"method": "suffix"}]
        head = shipped_head_for(args.model)
        if head:
            specs += [{"method": "eagle", "model": head, "num_speculative_tokens": 8},
                      {"method": "eagle", "model": head, "num_speculative_tokens": 8, "lookup": "ngram"}]
    methods = {"plain": None}
    for s in specs:
        label = s["method"] + ("+" + s["lookup"] if s.get("lookup") else "")
        methods[label] = {"adaptive": True, **s}
    llms = {m: LLM.from_model(model, tok, max_batch_size=2, speculative_config=c) for m, c in methods.items()}

    rng = random.Random(7)
    makers = {"extract": lambda: extract_prompts(rng, args.per_task), "answer": lambda: answer_prompts(args.per_task),
              "tool": lambda: tool_prompts(rng, args.per_task)}
    tasks = [(name, i, t) for name in args.tasks.split(",") for i, t in enumerate(makers[name]())]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / "records.jsonl"
    done = {}
    if records_path.exists():
        for line in records_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["method"], r["task"], r["index"])] = r

    def prompt_ids(llm, task) -> list[int]:
        # the tools rendered by the model's chat template (Qwen), or the fallback system message (SmolLM2)
        tools = tool_plan(task).prompt_tools if "tools" in task else None
        return llm.chat_prompt(task["messages"], tools=tools)

    def run_one(method: str, name: str, i: int, task: dict) -> None:
        if (method, name, i) in done:
            return
        llm = llms[method]
        sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, structured_outputs=constraint_of(task, tok))
        timer = ConstraintTimer()
        first: list[float] = []  # when the first token came (the prefill's end)

        def note(out, first=first):
            if not first and out.new_token_ids:
                first.append(time.perf_counter())
        with timer.installed():
            start = time.perf_counter()
            o = llm.generate([prompt_ids(llm, task)], sp, on_output=note)[0]
            seconds = time.perf_counter() - start
        s = o.stats
        rec = {"method": method, "task": name, "index": i, "tokens": len(o.token_ids), "seconds": seconds,
               "first_seconds": (first[0] - start) if first else seconds,
               "passes": s["target_passes"], "forced": s.get("forced_tokens", 0), "valid": validate(task, o.text),
               "finish": o.finish_reason, "constraint_seconds": timer.seconds, "token_ids": list(o.token_ids),
               "text": o.text}
        done[(method, name, i)] = rec
        with records_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    for m, llm in llms.items():  # warm-up: one short constrained answer each, untimed
        llm.generate([prompt_ids(llm, tasks[0][2])], SamplingParams(
            temperature=0.0, max_tokens=16, structured_outputs=constraint_of(tasks[0][2], tok)))
    order = ([(m, t) for t in tasks for m in methods] if not args.no_interleave
             else [(m, t) for m in methods for t in tasks])
    try:
        from tqdm import tqdm
        order = tqdm(order, desc="structured bench", unit="request")
    except ImportError:
        pass
    for m, (name, i, task) in order:
        run_one(m, name, i, task)

    lines = [f"Structured-output benchmark, {date.today()}, {cpu_name()} ({torch.get_num_threads()} threads), "
             f"{args.model} {args.quantization} {args.dtype}, greedy, max_tokens {args.max_tokens}, "
             f"{args.per_task} prompts per task, {'interleaved' if not args.no_interleave else 'method by method'}.",
             "tokens/s: output tokens over the whole request (prefill included); decode: the tokens after the first "
             "over the time after the first.",
             "", "| task | method | valid | = plain | tokens/s | vs plain | decode tokens/s | vs plain | MAL | "
             "forced share | constraint time |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in args.tasks.split(","):
        base = base_decode = None
        for m in methods:
            rs = [done[(m, name, i)] for (n, i, _) in tasks if n == name]
            plain = [done[("plain", name, i)] for (n, i, _) in tasks if n == name]
            toks, secs = sum(r["tokens"] for r in rs), sum(r["seconds"] for r in rs)
            rate = toks / secs
            decode = sum(r["tokens"] - 1 for r in rs) / sum(r["seconds"] - r["first_seconds"] for r in rs)
            base, base_decode = (rate, decode) if m == "plain" else (base, base_decode)
            same = sum(r["token_ids"] == q["token_ids"] for r, q in zip(rs, plain))
            lines.append(f"| {name} | {m} | {sum(r['valid'] for r in rs)}/{len(rs)} | {same}/{len(rs)} | {rate:.1f} | "
                         f"{rate / base:.2f}x | {decode:.1f} | {decode / base_decode:.2f}x | "
                         f"{toks / sum(r['passes'] for r in rs):.2f} | "
                         f"{sum(r['forced'] for r in rs) / toks:.0%} | "
                         f"{sum(r['constraint_seconds'] for r in rs) / secs:.1%} |")
    lines += ["", batch_check(model, tok, tasks, LLM, SamplingParams, constraint_of, args.max_tokens)]
    report = "\n".join(lines)
    (out / "summary.md").write_text(report + "\n")
    print(report)
    return 0


def batch_check(model, tok, tasks, LLM, SamplingParams, constraint_of, max_tokens: int) -> str:
    """An unconstrained request in a batch of two (ngram): its median time between steps
    while both rows run, beside (a) another unconstrained request, (b) the same request
    constrained by a grammar that allows any text (the same tokens, so the difference is
    the constraint machinery alone), (c) a schema-constrained one (its forced tokens widen
    every pass: more positions verified per step). Three interleaved rounds."""
    from draftwise.constraints import StructuredOutputsParams

    llm = LLM.from_model(model, tok, max_batch_size=2, speculative_config={"method": "ngram"})
    free = llm.chat_prompt([{"role": "user", "content": "Write a Python function that merges two sorted lists."}])
    task = next(t for n, _, t in tasks if "schema" in t)
    other = llm.chat_prompt(task["messages"])
    plain_sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    cases = {
        "beside an unconstrained request": None,
        "beside the same request under a grammar that allows any text": StructuredOutputsParams(regex=r"[\s\S]*"),
        "beside a schema-constrained request": constraint_of(task, tok),
    }
    steps: dict[str, list[float]] = {k: [] for k in cases}
    width: dict[str, list[float]] = {k: [] for k in cases}
    spent: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(3):
        for label, constraint in cases.items():
            sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_outputs=constraint)
            seen: list[tuple[float, int, bool]] = []  # (time, row, finished)
            reqs: dict[int, object] = {}

            def note(o, seen=seen, reqs=reqs):
                row = 0 if o.request.prompt_ids == free else 1
                reqs[row] = o.request
                seen.append((time.perf_counter(), row, o.finished))

            timer = ConstraintTimer()
            with timer.installed():
                llm.generate([free, other], [plain_sp, sp], on_output=note)
            end = next((t for t, row, fin in seen if row == 1 and fin), seen[-1][0])
            times = [t for t, row, _ in seen if row == 0 and t <= end]
            steps[label] += [b - a for a, b in zip(times, times[1:])]
            st = reqs[1].stats
            width[label].append(1 + (st.draft_tokens + 0.0) / max(1, st.target_passes))
            spent[label].append(timer.seconds / max(1, st.target_passes))
    median = {k: sorted(v)[len(v) // 2] if v else float("nan") for k, v in steps.items()}
    base = median["beside an unconstrained request"]
    parts = [f"{k}: {median[k] * 1000:.1f} ms ({median[k] / base:.2f}x; the neighbour verifies "
             f"{statistics.mean(width[k]):.2f} positions per pass, constraint work {statistics.mean(spent[k]) * 1000:.2f} ms "
             "per step)" for k in cases]
    return "Batch of two (ngram), an unconstrained request's median step time while both rows run: " + "; ".join(parts) + "."


if __name__ == "__main__":
    sys.exit(main())
