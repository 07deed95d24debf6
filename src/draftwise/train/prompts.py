"""A training prompt set written for the purpose: templates x topics, plus passages taken
from the docstrings of installed Python packages (summaries, questions, code tasks).

None of it comes from a benchmark. The mix mirrors what a chat model is asked in
practice (writing, explanation, coding, math word problems with fresh numbers,
translation, summarization, extraction, multi-step reasoning), so a head trained on the
target's answers sees the kind of text it will draft at serving time.

    python -m draftwise.train.prompts OUT.jsonl --count 3000 --seed 0 [--holdout HELD.jsonl --holdout-count 100]
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import sysconfig
from pathlib import Path

TOPICS = """the water cycle; photosynthesis; black holes; the French revolution; compound interest; vaccines;
plate tectonics; the stock market; machine learning; recycling; the immune system; electric cars; coffee;
sleep; volcanoes; the internet; bees; the Roman empire; climate change; chess; jazz; the moon landing;
renewable energy; inflation; DNA; earthquakes; public libraries; remote work; urban gardening; the printing press;
rainforests; credit scores; antibiotics; the Olympic games; solar panels; tea ceremonies; bridges; glaciers;
the human heart; meditation; time zones; the periodic table; penguins; the Silk Road; cloud computing; marathons;
3D printing; coral reefs; the blockchain; baking bread; microplastics; the Renaissance; volunteering; sharks;
password security; the metric system; hiking; democracy; the Great Wall of China; robots; tides; fermentation;
public transport; migration of birds; board games; the speed of light; composting; the history of money;
first aid; photography; wind turbines; the Amazon river; mental health; open source software; origami; deserts;
nuclear power; the human brain; job interviews; budgeting; knitting; tornadoes; saving water; museums;
email etiquette; dinosaurs; satellites; vitamins; the piano; learning a language; smartphones; honey;
the ocean floor; elections;
gravity; mushrooms; the Eiffel tower; typography; recycling electronics; volcanic islands;
rainbows; cheese making""".split(";")

TEMPLATES = [
    "Explain {t} to a ten-year-old.", "Write a short paragraph about {t}.", "What are the main benefits of {t}?",
    "Give me five interesting facts about {t}.", "Write a haiku about {t}.", "Write a short poem about {t}.",
    "Write a short story that involves {t}.", "What are common misconceptions about {t}?",
    "Summarize the history of {t} in a few sentences.", "How would you teach a beginner about {t}?",
    "Write a persuasive paragraph arguing that everyone should learn about {t}.",
    "List the pros and cons of {t}.", "Write a tweet about {t}.", "Describe {t} in three sentences.",
    "Write an email to a friend recommending a book about {t}.", "What questions would an expert ask about {t}?",
    "Create a quiz with three questions about {t}, with answers.", "Compare {t} and {u}.",
    "How are {t} and {u} related?", "Write a dialogue between two people discussing {t}.",
    "Give step-by-step advice for someone interested in {t}.",
    "Write a product description for a gadget inspired by {t}.",
    "Outline a five-minute presentation about {t}.", "What might {t} look like in fifty years?",
    "Explain {t} using an analogy.", "Write a limerick about {t}.",
]

CODE_TASKS = [
    "Write a Python function that {x}.", "Write a Python function that {x}, with a docstring and an example.",
    "How would you write a function that {x}? Show Python code.", "Write a JavaScript function that {x}.",
]
CODE_WHAT = """reverses a string; checks whether a number is prime; counts the words in a sentence;
merges two sorted lists; returns the n-th Fibonacci number; removes duplicates from a list while keeping order;
finds the largest element of a list; converts Celsius to Fahrenheit; checks whether a string is a palindrome;
flattens a nested list; computes the factorial of n;
sorts a list of dictionaries by a key; counts vowels in a string; returns the greatest common divisor of two numbers;
parses a date string in YYYY-MM-DD format; reads a CSV file and returns the rows; capitalizes every word of a sentence;
groups words by their first letter; computes the average of a list of numbers; validates an email address""".split(";")

LANGUAGES = ["French", "German", "Spanish", "Italian", "Portuguese", "Chinese", "Japanese"]
SENTENCES = ["The weather is nice today.", "Where is the nearest train station?",
             "I would like a cup of coffee, please.",
             "My brother works in a hospital.", "We are going to the beach tomorrow.", "This book is very interesting.",
             "Could you help me carry these boxes?", "The meeting starts at nine o'clock.", "I lost my keys yesterday.",
             "The children are playing in the garden."]


def math_prompt(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 60), rng.randint(2, 30), rng.randint(2, 12)
    return rng.choice([
        f"A shop sells pencils at {b} cents each. How much do {a} pencils cost in dollars? Explain step by step.",
        f"Tom has {a} marbles. He gives {b} to his sister and then buys {c} more. How many does he have now?",
        f"A train travels at {a} km per hour for {c} hours. How far does it go?",
        f"What is {a} times {b} plus {c}? Show your work.",
        f"A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter?",
        f"If {c} workers build a wall in {b} days, how long would {c * 2} workers take? Explain.",
        f"Solve for x: {c}x + {a} = {a + c * b}.",
        f"A recipe needs {c} eggs for {b} people. How many eggs are needed for {b * 3} people?",
    ])


def doc_passages(limit: int, rng: random.Random) -> list[str]:
    """Docstrings (200-1200 characters) of modules and functions in the standard library and site-packages."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    files = [f for r in roots for f in r.rglob("*.py") if "test" not in f.as_posix().lower()]
    rng.shuffle(files)
    out: list[str] = []
    for f in files:
        try:
            tree = ast.parse(f.read_text(errors="ignore"))
        except (SyntaxError, ValueError, OSError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        for n in nodes:
            doc = ast.get_docstring(n)
            if doc and 200 <= len(doc) <= 1200 and doc.isascii():
                out.append(doc.strip())
                break
        if len(out) >= limit:
            break
    return out


def build(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    topics = [t.strip() for t in TOPICS]
    passages = doc_passages(max(50, count // 5), rng)
    items: dict[str, None] = {}  # insertion-ordered set: no duplicate prompts
    for _ in range(count * 50):
        if len(items) >= count:
            break
        kind = rng.random()
        if kind < 0.45:
            t, u = rng.sample(topics, 2)
            items[rng.choice(TEMPLATES).format(t=t, u=u)] = None
        elif kind < 0.6:
            items[rng.choice(CODE_TASKS).format(x=rng.choice(CODE_WHAT).strip())] = None
        elif kind < 0.72:
            items[math_prompt(rng)] = None
        elif kind < 0.8:
            items[f"Translate into {rng.choice(LANGUAGES)}: {rng.choice(SENTENCES)}"] = None
        elif passages:
            p = rng.choice(passages)
            items[rng.choice([
                f"Summarize the following text in two sentences.\n\n{p}",
                f"Read this documentation and explain what it describes in plain words.\n\n{p}",
                f"What are the key points of this passage?\n\n{p}",
                f"Write one question a user might ask about this text, then answer it.\n\n{p}",
            ])] = None
    return [{"prompt": p} for p in items]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--holdout", default=None, help="also write held-out prompts (disjoint) here")
    ap.add_argument("--holdout-count", type=int, default=100)
    args = ap.parse_args(argv)
    items = build(args.count + (args.holdout_count if args.holdout else 0), args.seed)
    rng = random.Random(args.seed + 1)
    rng.shuffle(items)
    held = items[: args.holdout_count] if args.holdout else []
    train = items[len(held):]
    Path(args.out).write_text("".join(json.dumps(i) + "\n" for i in train))
    if args.holdout:
        Path(args.holdout).write_text("".join(json.dumps(i) + "\n" for i in held))
    note = f", {len(held)} held out -> {args.holdout}" if held else ""
    print(f"{len(train)} training prompts -> {args.out}{note}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
