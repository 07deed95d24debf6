"""Fresh prompts of the kinds one user sends all day, for the adaptive stream benchmark.

Each domain is one user's traffic: the same frame every time (a schema, a field list),
different questions in it. Prompts are generated here from a seed, so they come from no
training or evaluation set, and a replay with another seed gets prompts the stream never had.

- `sql`: questions about one shop's SQLite schema, answered with the query only;
- `extraction`: customer messages to turn into one JSON record of fixed fields.

    python benchmarks/stream_prompts.py sql 3 --seed 0     # print three
"""

from __future__ import annotations

import argparse
import json
import random

SCHEMA = """\
CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, email TEXT, city TEXT, country TEXT, signup_date DATE);
CREATE TABLE suppliers (id INTEGER PRIMARY KEY, name TEXT, country TEXT);
CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT, category TEXT, price REAL,
                       supplier_id INTEGER REFERENCES suppliers(id));
CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(id), order_date DATE,
                     status TEXT);  -- 'pending', 'shipped', 'delivered' or 'cancelled'
CREATE TABLE order_items (order_id INTEGER REFERENCES orders(id), product_id INTEGER REFERENCES products(id),
                          quantity INTEGER, unit_price REAL);
CREATE TABLE reviews (id INTEGER PRIMARY KEY, product_id INTEGER REFERENCES products(id),
                      customer_id INTEGER REFERENCES customers(id), rating INTEGER, created_at DATE);"""

SQL_SYSTEM = ("You write SQLite queries for the schema below. Reply with one query in a ```sql block and "
              "nothing else.\n\n" + SCHEMA)

COUNTRIES = ["Germany", "France", "Spain", "Italy", "Poland", "Sweden", "Canada", "Brazil", "Japan", "Kenya",
             "Mexico", "Norway", "India", "Chile", "Portugal"]
CITIES = ["Lyon", "Porto", "Osaka", "Nairobi", "Krakow", "Bergen", "Toronto", "Seville", "Turin", "Pune",
          "Valparaiso", "Gothenburg", "Leipzig", "Monterrey", "Curitiba"]
CATEGORIES = ["books", "garden", "kitchen", "toys", "electronics", "sports", "office", "pet supplies", "beauty",
              "music"]
STATUSES = ["pending", "shipped", "delivered", "cancelled"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]

SQL_QUESTIONS = [
    "List the {k} customers from {country} who spent the most in {year}, with their total spend.",
    "How many orders were {status} in each month of {year}?",
    "Which products in the {category} category have an average rating below {r}? Show the name and the average.",
    "Total revenue per supplier country for orders placed after {date}.",
    "Find the customers who signed up in {year} but never placed an order.",
    "For each category, the product with the highest revenue in {year}.",
    "Average order value of customers in {city}, per year.",
    "Products that were never reviewed, cheapest first.",
    "The {k} best-selling products by quantity in {month} {year}.",
    "Customers who bought from more than {n} different categories.",
    "The share of cancelled orders per customer country in {year}, highest first.",
    "Suppliers whose products average a rating of at least {r} over at least {n} reviews.",
    "Monthly revenue of the {category} category in {year}, with the change from the month before.",
    "The average number of days between signing up and the first order, for customers from {country}.",
    "Orders placed in {year} with more than {n} items in total, with the customer's name.",
    "The {k} cities with the most distinct customers who bought {category} products.",
    "Products in {category} priced above their category's average price, with the difference.",
    "For each customer in {country}, the date and status of their latest order.",
    "Revenue per category of {status} orders between {date} and {date2}.",
    "Customers who gave a rating of {low} or lower to a product they bought in {year}.",
    "How many {category} products does each supplier from {country} sell, most first?",
    "The {k} customers with the most reviews, with their average rating.",
    "Each month of {year}: the number of new customers and how many of them ordered that month.",
    "Orders from {city} that are still {status} more than {n} days after they were placed.",
]


def _date(rng: random.Random, year: int) -> str:
    return f"{year}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def sql_prompt(rng: random.Random) -> list[dict]:
    year = rng.randint(2019, 2025)
    slots = {"k": rng.choice([3, 5, 10, 20]), "country": rng.choice(COUNTRIES), "city": rng.choice(CITIES),
             "category": rng.choice(CATEGORIES), "status": rng.choice(STATUSES), "month": rng.choice(MONTHS),
             "year": year, "r": rng.choice([2, 2.5, 3, 3.5, 4, 4.5]), "n": rng.choice([2, 3, 5, 10, 30]),
             "low": rng.choice([1, 2]), "date": _date(rng, year), "date2": _date(rng, year + 1)}
    question = rng.choice(SQL_QUESTIONS).format(**slots)
    return [{"role": "system", "content": SQL_SYSTEM}, {"role": "user", "content": question}]


FIRST = ["Anna", "Jonas", "Mei", "Carlos", "Fatima", "Liam", "Sofia", "Kenji", "Amara", "Piotr", "Ines", "Omar",
         "Greta", "Ravi", "Lucia", "Tomas", "Yuki", "Nadia", "Erik", "Zara"]
LAST = ["Keller", "Moreau", "Nakamura", "Silva", "Haddad", "Novak", "Rossi", "Lindqvist", "Okafor", "Fischer",
        "Costa", "Petrov", "Duarte", "Meyer", "Sato", "Ibrahim", "Kowalski", "Larsen", "Romero", "Chen"]
PRODUCTS = ["a cordless drill", "the blue ceramic teapot", "two garden chairs", "a 27-inch monitor",
            "the hiking backpack (40 l)", "a set of kitchen knives", "noise-cancelling headphones",
            "a wooden train set", "the standing desk", "a cast-iron pan", "running shoes, size 42",
            "a coffee grinder", "the office chair", "a yoga mat", "an electric kettle"]
ISSUES = {
    "damaged": ["it arrived with a cracked {part}", "the box was crushed and the {part} is broken"],
    "late": ["it still has not arrived after {days} days", "the delivery is {days} days late"],
    "wrong_item": ["I received {other} instead", "the parcel contained {other}, not what I ordered"],
    "missing_part": ["the {part} was missing from the box", "it came without the {part}"],
    "billing": ["I was charged twice for it", "the invoice shows {amount} EUR more than the price at checkout"],
}
PARTS = ["handle", "lid", "power cable", "manual", "screws", "stand", "charger", "cover"]
ACTIONS = {
    "refund": ["I would like my money back.", "Please refund the full amount."],
    "replacement": ["Please send me a replacement.", "Could you ship a new one?"],
    "repair": ["Can it be repaired under warranty?", "I would like it repaired."],
    "cancel": ["Please cancel the order.", "I want to cancel it."],
    "information": ["Can you tell me what happened?", "Please let me know the status."],
}
EXTRACTION_TASK = (
    "Extract these fields from the customer message and reply with one JSON object and nothing else: "
    '"customer_name", "email", "phone" (null if none), "order_id", "product", "order_date" (YYYY-MM-DD), '
    '"issue" (one of "damaged", "late", "wrong_item", "missing_part", "billing"), "requested_action" (one of '
    '"refund", "replacement", "repair", "cancel", "information").')


def extraction_prompt(rng: random.Random) -> list[dict]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    issue = rng.choice(sorted(ISSUES))
    action = rng.choice(sorted(ACTIONS))
    year, month, day = rng.randint(2024, 2026), rng.randint(1, 12), rng.randint(1, 28)
    date = rng.choice([f"{day} {MONTHS[month - 1]} {year}", f"{MONTHS[month - 1]} {day}, {year}",
                       f"{day:02d}.{month:02d}.{year}"])
    order = rng.choice(["#", "no. ", "number ", ""]) + f"{rng.choice('ABKMRZ')}{rng.randint(10000, 99999)}"
    problem = rng.choice(ISSUES[issue]).format(part=rng.choice(PARTS), days=rng.randint(5, 30),
                                               other=rng.choice(PRODUCTS), amount=rng.randint(5, 90))
    email = f"{first.lower()}.{last.lower()}@{rng.choice(['mail.com', 'web.de', 'outlook.com', 'posteo.net'])}"
    phone = rng.choice([None, f"+{rng.randint(30, 49)} {rng.randint(100, 999)} {rng.randint(100000, 999999)}"])
    contact = f"You can reach me at {email}" + (f" or on {phone}." if phone else ".")
    sentences = [f"I ordered {rng.choice(PRODUCTS)} (order {order}) on {date} and {problem}.",
                 rng.choice(ACTIONS[action]), contact]
    if rng.random() < 0.5:
        sentences[1], sentences[2] = sentences[2], sentences[1]
    greeting = rng.choice(["Hello,", "Hi there,", "Dear support team,", "Good morning,"])
    message = f"{greeting}\n\n{' '.join(sentences)}\n\n{rng.choice(['Thanks', 'Best regards', 'Cheers'])}, {first} {last}"
    return [{"role": "user", "content": f"{EXTRACTION_TASK}\n\nMessage:\n{message}"}]


DOMAINS = {"sql": sql_prompt, "extraction": extraction_prompt}


def prompts(domain: str, n: int, seed: int, avoid: set[str] | None = None) -> list[list[dict]]:
    """`n` distinct conversations of `domain` from `seed` (none whose last message is in `avoid`)."""
    make = DOMAINS[domain]
    rng = random.Random(f"{domain}-{seed}")
    seen = set(avoid or ())
    out = []
    for _ in range(100 * n + 100):
        if len(out) == n:
            return out
        conv = make(rng)
        if conv[-1]["content"] not in seen:
            seen.add(conv[-1]["content"])
            out.append(conv)
    raise ValueError(f"{domain}: could not make {n} distinct prompts")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("domain", choices=sorted(DOMAINS))
    ap.add_argument("n", type=int)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for conv in prompts(args.domain, args.n, args.seed):
        print(json.dumps(conv, indent=1))


if __name__ == "__main__":
    main()
