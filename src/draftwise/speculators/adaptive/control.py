"""Which part of the adaptive speculator drafts, per request and step.

Terms. A *part* is one of the speculators the adaptive one is made of (`static`,
`learner`, `suffix`). For each part the arbiter keeps *E*, the expected number of draft
tokens the target accepts when that part drafts (bonus excluded), as a faded mean:

- over recent traffic (the *window*: each observation weighs `DECAY` of the one before,
  ~50 observations of memory), starting from an optimistic prior of `PRIOR_TOKENS`;
- per request, starting from the window's value (weight `REQUEST_PRIOR_WEIGHT`), so one
  request's own text (a copy-heavy one, say) moves its own choice quickly.

Observations come from two sources. The part that drafted is scored by what the target
accepted. A part that did not draft is scored against the tokens the target committed,
without running it where that is free: a lookup part's proposal (made anyway, it costs
microseconds) is matched against the committed tokens (for greedy requests exactly what
verification would have accepted); an EAGLE head, when it catches up on committed tokens
(now and then while not drafting), predicts each next token from the target's features,
and its first-token accuracy a gives E ~ a + a^2 + ... + a^depth. A part that is not
observed at all (a draft model not chosen) fades back toward the prior, so it is tried
again after a while: that is the exploration.

Confidence enters as eligibility: a lookup part that finds no match for a request
proposes nothing and is not a candidate; its E is measured only over steps where it had
a proposal, i.e. conditioned on having matched.

Choice: the part with the largest rate (1 + E) / (P + c), with P the measured seconds of a
target pass and c the part's measured drafting seconds per request; no part at all
(rate 1 / P) when none beats plain decoding. Drift: when a part's acceptance falls (the
traffic changed), its window falls with it within tens of observations, and the others
take over until it recovers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

DECAY = 0.98
PRIOR_TOKENS = 1.0
PRIOR_WEIGHT = 2.0
REQUEST_PRIOR_WEIGHT = 4.0
STALE = 0.995  # per step, every part's window weight fades (unobserved parts drift to the prior)


@dataclass
class Faded:
    """A faded mean: sum and weight of observations, each older one worth `decay` less."""

    total: float = 0.0
    weight: float = 0.0

    def add(self, x: float, decay: float = DECAY) -> None:
        self.total = self.total * decay + x
        self.weight = self.weight * decay + 1.0

    def fade(self, factor: float) -> None:
        self.total *= factor
        self.weight *= factor

    def mean(self, prior: float, prior_weight: float) -> float:
        return (self.total + prior * prior_weight) / (self.weight + prior_weight)


def saved_window_tokens(saved: dict | None) -> dict[str, float]:
    """Each part's E over recent traffic, read from a saved arbiter state (`Arbiter.state`)
    as `Arbiter.window_tokens` reads its own (`draftwise stats` shows them)."""
    window = (saved or {}).get("window", {})
    return {part: Faded(float(t), float(w)).mean(PRIOR_TOKENS, PRIOR_WEIGHT) for part, (t, w) in window.items()}


def geometric_tokens(a: float, depth: int) -> float:
    """a + a^2 + ... + a^depth: accepted tokens when each depth is accepted with chance a."""
    return sum(a ** j for j in range(1, depth + 1))


class Arbiter:
    def __init__(self, parts: Iterable[str]) -> None:
        self.parts = list(parts)
        self.window = {p: Faded() for p in self.parts}
        self.requests: dict[str, dict[str, Faded]] = {}
        self.draft_seconds = {p: Faded() for p in self.parts}  # per request per call
        self.pass_seconds = Faded()
        # counters (metrics): steps each part drafted, draft tokens, accepted tokens, shadow scores
        self.chosen = {p: 0 for p in self.parts}
        self.accepted = {p: 0 for p in self.parts}
        self.shadowed = {p: 0 for p in self.parts}
        self.none_chosen = 0

    # --- estimates --------------------------------------------------------------------

    def window_tokens(self, part: str) -> float:
        return self.window[part].mean(PRIOR_TOKENS, PRIOR_WEIGHT)

    def expected(self, request_id: str, part: str) -> float:
        """E for this request: its own observations on top of the window's estimate."""
        base = self.window_tokens(part)
        own = self.requests.get(request_id, {}).get(part)
        return base if own is None else own.mean(base, REQUEST_PRIOR_WEIGHT)

    def observe(self, request_id: str, part: str, accepted: float, shadow: bool = False) -> None:
        """`part` would have had (shadow) or had `accepted` draft tokens accepted for this request."""
        self.window[part].add(accepted)
        self.requests.setdefault(request_id, {}).setdefault(part, Faded()).add(accepted)
        if shadow:
            self.shadowed[part] += 1

    def observe_cost(self, part: str, seconds_per_request: float) -> None:
        self.draft_seconds[part].add(seconds_per_request, 0.9)

    def observe_pass(self, seconds: float) -> None:
        self.pass_seconds.add(seconds, 0.9)

    def forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    # --- choice -----------------------------------------------------------------------

    def step(self) -> None:
        for f in self.window.values():
            f.fade(STALE)

    def rate(self, request_id: str, part: str) -> float:
        p = self.pass_seconds.mean(0.0, 0.0) if self.pass_seconds.weight else 0.0
        c = self.draft_seconds[part].mean(0.0, 0.0) if self.draft_seconds[part].weight else 0.0
        tokens = 1.0 + self.expected(request_id, part)
        return tokens / (p + c) if p + c > 0 else tokens

    def choose(self, request_id: str, eligible: list[str]) -> str | None:
        """The part to draft for this request now, or None (plain decoding pays more)."""
        if not eligible:
            self.none_chosen += 1
            return None
        best = max(eligible, key=lambda part: (self.rate(request_id, part), -self.parts.index(part)))
        if self.pass_seconds.weight and self.rate(request_id, best) <= 1.0 / self.pass_seconds.mean(0.0, 0.0):
            self.none_chosen += 1
            return None
        self.chosen[best] += 1
        return best

    # --- persistence ---------------------------------------------------------------------

    def state(self) -> dict:
        return {"window": {p: [f.total, f.weight] for p, f in self.window.items()},
                "draft_seconds": {p: [f.total, f.weight] for p, f in self.draft_seconds.items()},
                "pass_seconds": [self.pass_seconds.total, self.pass_seconds.weight]}

    def load_state(self, state: dict) -> None:
        for p, (total, weight) in state.get("window", {}).items():
            if p in self.window:
                self.window[p] = Faded(float(total), float(weight))
        for p, (total, weight) in state.get("draft_seconds", {}).items():
            if p in self.draft_seconds:
                self.draft_seconds[p] = Faded(float(total), float(weight))
        if "pass_seconds" in state:
            total, weight = state["pass_seconds"]
            self.pass_seconds = Faded(float(total), float(weight))
