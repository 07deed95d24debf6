"""From per-generation records to the numbers of the report, per category and overall.

Definitions (Spec-Bench's where it has one):
- tokens_per_second: per question, output tokens of all its turns / their seconds; then
  the mean over questions.
- speedup: tokens_per_second of the method / tokens_per_second of plain decoding.
- mean_accepted_length: tokens committed per verifying target pass, bonus token counted
  (plain = 1.00): sum(output_tokens - 1) / sum(target_passes - 1), the prefill pass and
  its one token left out.
- acceptance_per_position[j]: of the drafts that reached depth j+1, the share accepted
  there; acceptance_rate: accepted draft tokens / drafted tokens.
- target_passes_per_token: target forward passes (prefill included) / output tokens.
- draft_time_share: time spent drafting / (drafting + verifying).
- exact_match: share of generations whose token ids equal plain decoding's.
"""

from __future__ import annotations

from typing import Any, Sequence

from draftwise.bench.dataset import Question
from draftwise.bench.methods import PLAIN, Method

OVERALL = "overall"


def complete_questions(records: dict, label: str, questions: Sequence[Question]) -> list[Question]:
    """Questions with every turn recorded without error for `label`."""
    done = []
    for q in questions:
        recs = [records.get((str(q.question_id), t, label)) for t in range(len(q.turns))]
        if all(r is not None and not r.get("error") for r in recs):
            done.append(q)
    return done


def ratio(num: float, den: float, empty: float | None = None) -> float | None:
    return num / den if den else empty


def aggregate(recs: list[dict], per_question: list[list[dict]], plain: dict, is_plain: bool) -> dict[str, Any]:
    """The numbers of one method over one set of questions (`per_question`: their records)."""
    speeds = []
    for turns in per_question:
        secs = sum(r["seconds"] for r in turns)
        if secs > 0:
            speeds.append(sum(r["output_tokens"] for r in turns) / secs)
    out: dict[str, Any] = {
        "questions": len(per_question),
        "generations": len(recs),
        "output_tokens": sum(r["output_tokens"] for r in recs),
        "seconds": round(sum(r["seconds"] for r in recs), 4),
        "tokens_per_second": round(sum(speeds) / len(speeds), 4) if speeds else None,
        "speedup": None,
    }
    stats = [r["stats"] for r in recs if r.get("stats")]
    if stats and len(stats) == len(recs):
        tokens = sum(s["output_tokens"] for s in stats)
        passes = sum(s["target_passes"] for s in stats)
        decode_tokens = sum(s["output_tokens"] - 1 for s in stats if s["target_passes"] > 1)
        decode_passes = sum(s["target_passes"] - 1 for s in stats if s["target_passes"] > 1)
        depth = max((len(s["drafted_per_position"]) for s in stats), default=0)
        acc = [sum(s["accepted_per_position"][j] for s in stats if j < len(s["accepted_per_position"]))
               for j in range(depth)]
        drafted = [sum(s["drafted_per_position"][j] for s in stats if j < len(s["drafted_per_position"]))
                   for j in range(depth)]
        draft_s = sum(s["draft_seconds"] for s in stats)
        verify_s = sum(s["verify_seconds"] for s in stats)
        out.update(
            mean_accepted_length=round(ratio(decode_tokens, decode_passes, 1.0), 4),
            acceptance_rate=None if is_plain else round(ratio(sum(s["accepted_tokens"] for s in stats),
                                                              sum(s["draft_tokens"] for s in stats), 0.0), 4),
            acceptance_per_position=[round(a / d, 4) if d else 0.0 for a, d in zip(acc, drafted)],
            target_passes_per_token=round(ratio(passes, tokens, 0.0), 4),
            draft_time_share=round(ratio(draft_s, draft_s + verify_s, 0.0), 4),
        )
    else:  # a peer engine: no speculation counters
        out.update(mean_accepted_length=None, acceptance_rate=None, acceptance_per_position=None,
                   target_passes_per_token=None, draft_time_share=None)
    if is_plain:
        out.update(exact_match=None, exact_match_compared=0)
    else:
        pairs = [(r, plain.get((str(r["question_id"]), r["turn"]))) for r in recs]
        pairs = [(r, p) for r, p in pairs if p is not None]
        same = sum(r["token_ids"] == p["token_ids"] for r, p in pairs)
        out.update(exact_match=round(same / len(pairs), 4) if pairs else None, exact_match_compared=len(pairs))
    return out


def summarize(records: list[dict], methods: Sequence[Method], questions: Sequence[Question]) -> dict[str, Any]:
    """{label: {"overall": {...}, "categories": {group: {...}}}} plus mismatches and counts."""
    by_key = {(str(r["question_id"]), int(r["turn"]), r["method"]): r for r in records}
    plain = {(q, t): r for (q, t, m), r in by_key.items() if m == PLAIN and not r.get("error")}
    groups = list(dict.fromkeys(q.group for q in questions))
    results: dict[str, Any] = {}
    for m in methods:
        done = complete_questions(by_key, m.label, questions)
        per_group: dict[str, Any] = {}
        for g in [*groups, OVERALL]:
            qs = [q for q in done if g == OVERALL or q.group == g]
            per_q = [[by_key[(str(q.question_id), t, m.label)] for t in range(len(q.turns))] for q in qs]
            flat = [r for turns in per_q for r in turns]
            per_group[g] = aggregate(flat, per_q, plain, m.label == PLAIN)
        errors = sum(1 for (_, _, lab), r in by_key.items() if lab == m.label and r.get("error"))
        results[m.label] = {"overall": per_group.pop(OVERALL), "categories": per_group, "errors": errors}
    base = results.get(PLAIN, {})
    for label, res in results.items():
        for g, row in [(OVERALL, res["overall"]), *res["categories"].items()]:
            ref = base.get("overall") if g == OVERALL else base.get("categories", {}).get(g)
            if ref and ref["tokens_per_second"] and row["tokens_per_second"] is not None:
                row["speedup"] = round(row["tokens_per_second"] / ref["tokens_per_second"], 4)
    return {"categories": groups, "results": results, "mismatches": mismatches(by_key, methods, plain)}


def mismatches(by_key: dict, methods: Sequence[Method], plain: dict) -> list[dict[str, Any]]:
    """Every generation whose tokens differ from plain decoding's, with the first differing index."""
    found = []
    kinds = {m.label: m.kind for m in methods}
    for (qid, turn, label), r in sorted(by_key.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        p = plain.get((qid, turn))
        if label == PLAIN or label not in kinds or p is None or r.get("error") or r["token_ids"] == p["token_ids"]:
            continue
        a, b = r["token_ids"], p["token_ids"]
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        found.append({"method": label, "kind": kinds[label], "question_id": r["question_id"], "turn": turn,
                      "first_difference": first, "output_tokens": len(a), "plain_output_tokens": len(b)})
    return found
