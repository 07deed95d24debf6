"""A training prompt set written for the purpose: templates x topics, plus passages taken
from the docstrings of installed Python packages (summaries, questions, code tasks).

None of it comes from a benchmark. The mix mirrors what a chat model is asked in
practice (writing, explanation, coding, math word problems with fresh numbers,
translation, summarization, extraction, multi-step reasoning), so a head trained on the
target's answers sees the kind of text it will draft at serving time.

    python -m draftwise.train.prompts OUT.jsonl --count 3000 --seed 0 [--holdout HELD.jsonl --holdout-count 100]
    python -m draftwise.train.prompts OUT.jsonl --mix broad --count 1200 --seed 23

`--mix templates` (the default, and what the shipped heads' first stages used) is the
template set above; `--mix broad` widens it: factual questions, role play, letters and
other writing, reasoning puzzles and multi-step word problems with fresh numbers,
translation into English, extraction from generated records, and tasks over the source
of real functions of the installed packages (explain, test, review, type). The two mixes
are separate generators, so each reproduces its own list for a seed.
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


def parsed_sources(rng: random.Random):
    """(text, syntax tree) of the standard library's and site-packages' modules (tests left
    out), in an order drawn from `rng`; files that do not parse are skipped."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    files = [f for r in roots for f in r.rglob("*.py") if "test" not in f.as_posix().lower()]
    rng.shuffle(files)
    for f in files:
        try:
            text = f.read_text(errors="ignore")
            yield text, ast.parse(text)
        except (SyntaxError, ValueError, OSError):
            continue


def doc_passages(limit: int, rng: random.Random) -> list[str]:
    """Docstrings (200-1200 characters) of modules and functions in the standard library and site-packages."""
    out: list[str] = []
    for _, tree in parsed_sources(rng):
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        for n in nodes:
            doc = ast.get_docstring(n)
            if doc and 200 <= len(doc) <= 1200 and doc.isascii():
                out.append(doc.strip())
                break
        if len(out) >= limit:
            break
    return out


def distinct(count: int, draw) -> list[dict]:
    """Up to `count` different prompts from `draw()` (None: nothing this time), in the
    order first drawn; at most 50 draws per prompt wanted."""
    items: dict[str, None] = {}  # insertion-ordered set: no duplicate prompts
    for _ in range(count * 50):
        if len(items) >= count:
            break
        p = draw()
        if p is not None:
            items[p] = None
    return [{"prompt": p} for p in items]


def build(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    topics = [t.strip() for t in TOPICS]
    passages = doc_passages(max(50, count // 5), rng)

    def draw() -> str | None:
        kind = rng.random()
        if kind < 0.45:
            t, u = rng.sample(topics, 2)
            return rng.choice(TEMPLATES).format(t=t, u=u)
        if kind < 0.6:
            return rng.choice(CODE_TASKS).format(x=rng.choice(CODE_WHAT).strip())
        if kind < 0.72:
            return math_prompt(rng)
        if kind < 0.8:
            return f"Translate into {rng.choice(LANGUAGES)}: {rng.choice(SENTENCES)}"
        if not passages:
            return None
        p = rng.choice(passages)
        return rng.choice([
            f"Summarize the following text in two sentences.\n\n{p}",
            f"Read this documentation and explain what it describes in plain words.\n\n{p}",
            f"What are the key points of this passage?\n\n{p}",
            f"Write one question a user might ask about this text, then answer it.\n\n{p}",
        ])

    return distinct(count, draw)


QUESTION_STEMS = [
    "Why does {t} matter?", "How does {t} actually work?", "What is the difference between {t} and {u}?",
    "Who benefits most from {t}, and why?", "When did people first start studying {t}?",
    "What would happen if {t} suddenly disappeared?", "Is {t} overrated? Give a balanced answer.",
    "What is one thing most people get wrong about {t}?", "What skills does a career related to {t} need?",
    "Which books or resources would you suggest for learning about {t}?",
    "In one paragraph, what is {t}?", "How has {t} changed in the last twenty years?",
]
ROLES = ["a museum guide", "a pirate captain", "a detective in 1920s London", "a friendly librarian",
         "a sports commentator", "a chef on a cooking show", "a tour guide in Rome", "a medieval knight",
         "an astronaut on the space station", "a kindergarten teacher", "a grumpy cat", "a startup founder",
         "a personal trainer", "a park ranger", "a radio DJ", "a travel agent"]
ROLE_TASKS = ["Introduce yourself and describe a typical day.", "Give advice to someone who feels stuck.",
              "Explain {t} in your own style.", "Describe the most surprising thing you have seen.",
              "Convince me to try something new this weekend.", "Answer a customer who is unhappy about a delay."]
WRITING = [
    "Write a polite email asking a landlord to fix a broken heater.", "Write a cover letter for a junior {j} position.",
    "Write a thank-you note to a colleague who helped with {t}.", "Write a short speech for a friend's wedding.",
    "Write a product review of a pair of running shoes.", "Write a travel blog post about a weekend in {c}.",
    "Draft an announcement that the office will close early on Friday.",
    "Write a short news report about a local {t} festival.", "Write a recipe for a simple vegetable soup.",
    "Write the opening paragraph of a mystery novel set in {c}.", "Write a LinkedIn post about learning {t}.",
    "Rewrite this sentence to be more formal: hey, can u send me the report asap?",
    "Write a motivational message for a student before an exam.", "Write a complaint letter about a late delivery.",
]
JOBS = ["software engineer", "data analyst", "nurse", "graphic designer", "accountant", "teacher", "marketing"]
CITIES = ["Lisbon", "Kyoto", "Toronto", "Nairobi", "Prague", "Buenos Aires", "Oslo", "Hanoi", "Edinburgh", "Marrakesh"]
NAMES = ["Alice", "Bob", "Carmen", "Dmitri", "Emeka", "Fatima", "Gustav", "Hana", "Ivan", "Julia", "Kofi", "Lena"]
TO_ENGLISH = [
    "Der Zug nach Berlin hat heute zwanzig Minuten Verspätung.", "Ich habe gestern ein neues Fahrrad gekauft.",
    "Kannst du mir bitte sagen, wo die Bibliothek ist?", "Die Regierung plant neue Regeln für den Verkehr.",
    "Unsere Firma sucht erfahrene Entwickler für ein neues Projekt.", "Im Winter ist es hier sehr kalt und dunkel.",
    "Le musée est fermé le lundi et ouvert tous les autres jours.", "Nous avons besoin de plus de temps pour finir.",
    "La ville a construit un nouveau pont sur la rivière.", "Elle apprend le piano depuis trois ans.",
    "El mercado abre a las ocho de la mañana.", "Mi hermana vive en una casa pequeña cerca del mar.",
    "Los estudiantes presentaron su proyecto ayer.", "No encuentro mis gafas por ninguna parte.",
    "Il ristorante serve la migliore pizza della città.", "Domani andremo in montagna con gli amici.",
]
CODE_WHAT_BROAD = """parses a log line into a dictionary; implements binary search; computes a moving average;
validates a sudoku board; converts a Roman numeral to an integer; finds all anagrams of a word in a list;
implements an LRU cache; counts the frequency of each character; rotates a matrix by 90 degrees;
merges overlapping intervals; checks balanced parentheses; implements a stack with a list;
returns the n most common words in a text; converts a dictionary to a query string; chunks a list into pieces of size n;
finds the longest common prefix of strings; computes the edit distance of two strings;
retries a function call with exponential backoff; reads a JSON file and prints its keys;
implements breadth-first search on a graph; transposes a matrix; generates all permutations of a list""".split(";")
CODE_FORMS = [
    "Write a Python function that {x}.", "Write a Python class that {x}, with a short usage example.",
    "Write a Python function that {x}, and explain its time complexity.",
    "Write a JavaScript function that {x}.", "Write a Go function that {x}.", "Write a C function that {x}.",
    "Write a Python function that {x}, with pytest tests.", "Write a TypeScript function that {x}.",
]
SOURCE_TASKS = ["Explain what this Python function does.", "Write pytest unit tests for this function.",
                "Review this code and point out possible bugs or edge cases.", "Add type hints to this function.",
                "Rewrite this function to be easier to read.", "Describe the inputs and outputs of this function."]


def word_problem(rng: random.Random) -> str:
    """Multi-step arithmetic with fresh numbers (two to three operations)."""
    a, b, c, d = rng.randint(3, 40), rng.randint(2, 15), rng.randint(2, 9), rng.randint(5, 90)
    n1, n2 = rng.sample(NAMES, 2)
    return rng.choice([
        f"{n1} earns ${a} a day and saves a {c}th of it. How much does {n1} save in {b} weeks of 5 working days?",
        f"A farm has {a} cows and {b} times as many chickens. Each cow eats {c} kg of hay a day. How many animals "
        f"are there, and how much hay do the cows eat in a week?",
        f"{n1} reads {b} pages a day and {n2} reads {b + c} pages a day. A book has {d * 4} pages. "
        f"How many days sooner does {n2} finish it?",
        f"A store had {d} apples. It sold {a % d} in the morning and half of the rest in the afternoon. "
        f"How many apples are left?",
        f"A ticket costs ${b}. A group of {a} people gets {c * 5}% off. What does the group pay in total?",
        f"{n1} is {c} years older than {n2}. In {b} years their ages will add up to {2 * a + c + 2 * b}. "
        f"How old is each now?",
        f"A tank holds {d * 10} liters and leaks {c} liters per hour while a pipe adds {b} liters per hour. "
        f"Starting full, what happens after {a} hours?",
    ])


def puzzle(rng: random.Random) -> str:
    a, b, c = rng.sample(NAMES, 3)
    return rng.choice([
        f"{a} is taller than {b}, and {b} is taller than {c}. Who is the shortest? Explain your reasoning.",
        f"{a}, {b} and {c} each own one pet: a cat, a dog, a fish. {a} does not own the dog; {c} owns the fish. "
        f"Who owns which pet?",
        "If all bloops are razzies and some razzies are lazzies, must some bloops be lazzies? Explain.",
        f"{a} finished a race before {b} but after {c}. Who came second?",
        "A clock shows 3:15. What is the angle between its hands? Explain step by step.",
    ])


def record(rng: random.Random) -> str:
    rows = []
    for _ in range(rng.randint(3, 5)):
        rows.append(f"{rng.choice(NAMES)} from {rng.choice(CITIES)} ordered {rng.randint(1, 9)} "
                    f"{rng.choice(['laptops', 'chairs', 'books', 'lamps', 'bikes'])} on 2024-"
                    f"{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} for ${rng.randint(20, 900)}.")
    task = rng.choice(["Extract every name, city and date as a JSON list.", "Make a markdown table of these orders.",
                       "Which order was the most expensive? Answer briefly.", "Total the amounts per city."])
    return f"{task}\n\n" + "\n".join(rows)


def function_sources(limit: int, rng: random.Random) -> list[str]:
    """Source of short functions (6-30 lines, with a docstring) of the standard library and site-packages."""
    out: list[str] = []
    for text, tree in parsed_sources(rng):
        for n in ast.walk(tree):
            if isinstance(n, ast.FunctionDef) and 6 <= n.end_lineno - n.lineno + 1 <= 30:
                src = ast.get_source_segment(text, n)
                if src and src.isascii() and ast.get_docstring(n):
                    out.append(src)
                    break
        if len(out) >= limit:
            break
    return out


def build_broad(count: int, seed: int = 0) -> list[dict]:
    """The broad mix (see the module's docstring)."""
    rng = random.Random(seed)
    topics = [t.strip() for t in TOPICS]
    passages = doc_passages(max(50, count // 8), rng)
    sources = function_sources(max(50, count // 8), rng)

    def draw() -> str | None:
        t, u = rng.sample(topics, 2)
        kind = rng.random()
        if kind < 0.16:
            return rng.choice(QUESTION_STEMS).format(t=t, u=u)
        if kind < 0.24:
            return f"Pretend you are {rng.choice(ROLES)}. " + rng.choice(ROLE_TASKS).format(t=t)
        if kind < 0.34:
            return rng.choice(WRITING).format(t=t, j=rng.choice(JOBS), c=rng.choice(CITIES))
        if kind < 0.46:
            return word_problem(rng)
        if kind < 0.52:
            return puzzle(rng)
        if kind < 0.58:
            return f"Translate into English: {rng.choice(TO_ENGLISH)}"
        if kind < 0.64:
            return record(rng)
        if kind < 0.76:
            return rng.choice(CODE_FORMS).format(x=rng.choice(CODE_WHAT_BROAD).strip())
        if kind < 0.88 and sources:
            return f"{rng.choice(SOURCE_TASKS)}\n\n```python\n{rng.choice(sources)}\n```"
        if not passages:
            return None
        return rng.choice([
            f"Rewrite this documentation for a beginner.\n\n{rng.choice(passages)}",
            f"Answer from the text only: what does it say about errors or limits?\n\n{rng.choice(passages)}",
            f"Summarize this text in one paragraph.\n\n{rng.choice(passages)}",
        ])

    return distinct(count, draw)


MIXES = {"templates": build, "broad": build_broad}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--holdout", default=None, help="also write held-out prompts (disjoint) here")
    ap.add_argument("--holdout-count", type=int, default=100)
    ap.add_argument("--mix", default="templates", choices=sorted(MIXES),
                    help="templates: the first stages' set; broad: a wider one (see above)")
    args = ap.parse_args(argv)
    items = MIXES[args.mix](args.count + (args.holdout_count if args.holdout else 0), args.seed)
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
