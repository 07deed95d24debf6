"""Spec-Bench style prompt sets: one JSON object a line, `{"question_id", "category", "turns"}`.

Spec-Bench reports six categories; its eight MT-bench categories (writing, roleplay, ...)
are reported together as `mt_bench`, the way its own evaluation script groups them. That
grouping applies only to a Spec-Bench file (one holding any of Spec-Bench's own
categories) or an MT-bench file (at least `MT_BENCH_MIN` of the eight); any other dataset
keeps its categories as it names them (a category of one's own called `math` stays `math`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from draftwise.errors import BadInput

MT_BENCH_CATEGORIES = frozenset(
    {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
)
MT_BENCH_MIN = 5  # MT-bench categories that make a file an MT-bench file
SPEC_BENCH_CATEGORIES = frozenset({"translation", "summarization", "qa", "math_reasoning", "rag"})


def report_category(category: str, mt_bench_file: bool = True) -> str:
    """The category a question is reported under (in an MT-bench file, its eight -> `mt_bench`)."""
    return "mt_bench" if mt_bench_file and category in MT_BENCH_CATEGORIES else category


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str  # as in the file
    turns: tuple[str, ...]  # user messages; later turns see the model's earlier answers
    mt_bench_file: bool = True  # from a file holding MT-bench's categories (they are grouped)

    @property
    def group(self) -> str:
        return report_category(self.category, self.mt_bench_file)


def parse_line(line: str, number: int, source: str) -> Question:
    """One dataset line -> Question; BadInput naming the line on anything malformed."""
    where = f"{source} line {number}"
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadInput(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{where}: expected a JSON object with question_id, category and turns")
    missing = [k for k in ("question_id", "category", "turns") if k not in data]
    if missing:
        raise BadInput(f"{where}: missing field(s) {', '.join(missing)}")
    qid, category, turns = data["question_id"], data["category"], data["turns"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise BadInput(f"{where}: question_id must be an integer or a string")
    if not isinstance(category, str) or not category:
        raise BadInput(f"{where}: category must be a non-empty string")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
        raise BadInput(f"{where}: turns must be a non-empty list of non-empty strings")
    return Question(qid, category, tuple(turns))


def load_questions(
    path: str | Path, categories: Sequence[str] | None = None, limit: int | None = None
) -> list[Question]:
    """Read a dataset; keep `categories` (file names or report groups such as `mt_bench`)
    and at most `limit` questions of each reported category, in file order."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"dataset {path} not found")
    questions: list[Question] = []
    seen: set = set()
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            q = parse_line(line, number, str(path))
            if q.question_id in seen:
                raise BadInput(f"{path} line {number}: duplicate question_id {q.question_id!r}")
            seen.add(q.question_id)
            questions.append(q)
    present = {q.category for q in questions}
    if not present & SPEC_BENCH_CATEGORIES and len(present & MT_BENCH_CATEGORIES) < MT_BENCH_MIN:
        questions = [Question(q.question_id, q.category, q.turns, mt_bench_file=False) for q in questions]
    if categories:
        wanted = set(categories)
        known = {q.category for q in questions} | {q.group for q in questions}
        unknown = sorted(wanted - known)
        if unknown:
            raise BadInput(f"unknown categor{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; "
                           f"the dataset has: {', '.join(sorted(known))}")
        questions = [q for q in questions if q.category in wanted or q.group in wanted]
    if limit is not None:
        if limit < 1:
            raise BadInput("--limit must be at least 1")
        counts: dict[str, int] = {}
        kept = []
        for q in questions:
            if counts.get(q.group, 0) < limit:
                counts[q.group] = counts.get(q.group, 0) + 1
                kept.append(q)
        questions = kept
    if not questions:
        raise BadInput(f"{path}: no questions to run")
    return questions
