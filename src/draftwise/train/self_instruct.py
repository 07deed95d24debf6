"""Self-instruct training prompts: a chat model writes the user questions itself.

An aligned chat model, given its chat template up to the start of a user turn and nothing
more, writes a plausible user message (the "pre-query template" idea of Magpie, Xu et al.
2024). Sampled at temperature ~1 this gives varied, natural questions in the model's own
distribution, which templated prompts lack, and it needs no text from anywhere else. A
system message per prompt names a broad kind of request (chat, writing, translation,
summarizing a passage, math, coding, ...) so the mix is not only the model's favourite
kind (a coder model would otherwise ask mostly for code).

    python -m draftwise.train.self_instruct OUT.jsonl --model qwen2.5-coder-0.5b --count 1500 --seed 0

Questions are deduplicated and kept only when 12-1500 characters long. Nothing here comes
from a benchmark.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from tqdm import tqdm

from draftwise.errors import BadInput

KINDS = [
    "everyday questions and advice", "explanations of science or history", "creative writing (stories, poems, "
    "slogans)", "translating a sentence or short paragraph between languages", "summarizing a text they paste in",
    "answering a question about a passage they paste in", "math word problems and arithmetic",
    "programming questions in Python, JavaScript, C++ or SQL", "debugging a short piece of code they paste in",
    "writing emails, letters and announcements", "planning trips, meals, workouts or events",
    "comparing products, ideas or options", "definitions and explanations of words or concepts",
    "role-play and casual conversation", "extracting information (names, dates, numbers) from a text they paste in",
    "logic puzzles and step-by-step reasoning", "business, finance and career questions",
    "health, cooking and lifestyle questions",
]


def pre_query(tokenizer, kind: str) -> str:
    """The chat template up to where the user's words begin."""
    system = f"You are a helpful assistant. The user will ask about: {kind}."
    marker = "\x00USER\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": marker}], tokenize=False,
        add_generation_prompt=False)
    if marker not in text:
        raise BadInput("this model's chat template does not show the user's text; self-instruct needs one that does")
    return text[: text.index(marker)]


def write_questions(model, tokenizer, count: int, seed: int = 0, max_tokens: int = 160, batch_size: int = 16,
                    temperature: float = 1.0, top_p: float = 0.98, progress: bool = True) -> list[str]:
    """`count` distinct user questions sampled from the model (fewer if it keeps repeating itself)."""
    from draftwise.engine.engine import Engine
    from draftwise.sampling import SamplingParams

    if not getattr(tokenizer, "chat_template", None):
        raise BadInput("self-instruct needs a chat model (a tokenizer with a chat template)")
    rng = random.Random(seed)
    eos = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
           if isinstance(t, int) and t >= 0]
    engine = Engine(model, tokenizer, max_batch_size=batch_size, max_model_len=512)
    found: dict[str, None] = {}
    bar = tqdm(total=count, desc="self-instruct", unit="prompt", disable=not progress)
    attempts = 0
    while len(found) < count and attempts < 3 * count:
        wave = min(4 * batch_size, 3 * count - attempts)
        for _ in range(wave):
            attempts += 1
            kind = rng.choice(KINDS)
            ids = tokenizer.encode(pre_query(tokenizer, kind), add_special_tokens=False)
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                    seed=rng.randrange(2**31), stop_token_ids=eos)
            engine.add_request(ids, params)
        done = []
        while engine.has_work:
            done += [o for o in engine.step() if o.finished]
        for o in done:
            req = o.request
            if req.finish_reason != "stop":
                continue  # cut off: not a whole question
            text = tokenizer.decode(req.output_ids, skip_special_tokens=True).strip()
            if 12 <= len(text) <= 1500 and text not in found and len(found) < count:
                found[text] = None
                bar.update(1)
    bar.close()
    return list(found)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="chat model that writes the questions")
    ap.add_argument("--count", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--quantization", default="none", help="of the writing model (e.g. w4a8-all on the CPU)")
    args = ap.parse_args(argv)
    from draftwise.api import load_model

    model, tokenizer = load_model(args.model, "bf16", None, True, args.quantization)
    questions = write_questions(model, tokenizer, args.count, args.seed, batch_size=args.batch_size)
    Path(args.out).write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    print(f"{len(questions)} self-instruct prompts -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
