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

Confidence enters twice. As eligibility: a lookup part that finds no match for a request
proposes nothing and is not a candidate. And as a *score*: a part that rates its own
proposal (the suffix cache: the sum of its path probabilities, the accepted tokens its
counts expect) has E kept per band of that score (`SCORE_EDGES`), each band starting from
the score itself, so a strong match and a weak one of the same part are told apart (one
mean per part let a head with half the acceptance draft where the cache's match was long).

Calibration: a head's shadow E (from its first-token accuracy) assumes every depth is
accepted as often as the first, which overstates a tree under a small budget (measured on
the 1.5B: 0.96 shadow, 0.49 accepted when it drafted). Its shadow scores are scaled by the
ratio of what it had accepted when it drafted to what its shadow predicted, both faded
means over the window, once each has `CALIBRATE_AFTER` observations.

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
SCORE_EDGES = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # bands of a proposal's own score (expected tokens)
CALIBRATE_AFTER = 5.0  # faded observations of both kinds before a head's shadow scores are scaled
CALIBRATION_RANGE = (0.25, 1.5)


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


def band(score: float) -> int:
    """Index of the `SCORE_EDGES` band a proposal's score falls in."""
    return sum(score >= edge for edge in SCORE_EDGES)


def geometric_tokens(a: float, depth: int) -> float:
    """a + a^2 + ... + a^depth: accepted tokens when each depth is accepted with chance a."""
    return sum(a ** j for j in range(1, depth + 1))


class Arbiter:
    def __init__(self, parts: Iterable[str]) -> None:
        self.parts = list(parts)
        self.window = {p: Faded() for p in self.parts}
        self.requests: dict[str, dict[str, Faded]] = {}
        self.draft_seconds = {p: Faded() for p in self.parts}  # per request per call
        self.scored: dict[str, list[Faded]] = {}  # part -> one window per score band
        self.drafted = {p: Faded() for p in self.parts}  # accepted when the part drafted (calibration)
        self.predicted = {p: Faded() for p in self.parts}  # shadow predictions before scaling (calibration)
        self.pass_seconds = Faded()
        # counters (metrics): steps each part drafted, draft tokens, accepted tokens, shadow scores
        self.chosen = {p: 0 for p in self.parts}
        self.accepted = {p: 0 for p in self.parts}
        self.shadowed = {p: 0 for p in self.parts}
        self.none_chosen = 0

    # --- estimates --------------------------------------------------------------------

    def window_tokens(self, part: str) -> float:
        return self.window[part].mean(PRIOR_TOKENS, PRIOR_WEIGHT)

    def expected(self, request_id: str, part: str, score: float | None = None) -> float:
        """E for this request: with a proposal's score, the window of its band (starting from
        the score); else the request's own observations on top of the window's estimate."""
        if score is not None:
            bands = self.scored.get(part)
            f = bands[band(score)] if bands else Faded()
            return f.mean(score, PRIOR_WEIGHT)
        base = self.window_tokens(part)
        own = self.requests.get(request_id, {}).get(part)
        return base if own is None else own.mean(base, REQUEST_PRIOR_WEIGHT)

    def observe(self, request_id: str, part: str, accepted: float, shadow: bool = False,
                score: float | None = None) -> None:
        """`part` would have had (shadow) or had `accepted` draft tokens accepted for this
        request, with a proposal of this `score` when the part rates its proposals."""
        self.window[part].add(accepted)
        self.requests.setdefault(request_id, {}).setdefault(part, Faded()).add(accepted)
        if score is not None:
            self.scored.setdefault(part, [Faded() for _ in range(len(SCORE_EDGES) + 1)])[band(score)].add(accepted)
        if shadow:
            self.shadowed[part] += 1
        else:
            self.drafted[part].add(accepted)

    def calibration(self, part: str) -> float:
        """What `part` had accepted when it drafted over what its shadow scores predicted."""
        real, pred = self.drafted[part], self.predicted[part]
        if min(real.weight, pred.weight) < CALIBRATE_AFTER or pred.total <= 0:
            return 1.0
        lo, hi = CALIBRATION_RANGE
        return min(hi, max(lo, real.mean(0.0, 0.0) / pred.mean(0.0, 0.0)))

    def observe_prediction(self, request_id: str, part: str, predicted: float) -> None:
        """A shadow score that is a model's prediction (a head's, from its accuracy): scaled by
        the part's calibration before it counts."""
        self.predicted[part].add(predicted)
        self.observe(request_id, part, predicted * self.calibration(part), shadow=True)

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
        for bands in self.scored.values():
            for f in bands:
                f.fade(STALE)

    def rate(self, request_id: str, part: str, score: float | None = None) -> float:
        p = self.pass_seconds.mean(0.0, 0.0) if self.pass_seconds.weight else 0.0
        c = self.draft_seconds[part].mean(0.0, 0.0) if self.draft_seconds[part].weight else 0.0
        tokens = 1.0 + self.expected(request_id, part, score)
        return tokens / (p + c) if p + c > 0 else tokens

    def choose(self, request_id: str, eligible: list[str], scores: dict[str, float] | None = None) -> str | None:
        """The part to draft for this request now, or None (plain decoding pays more).
        `scores`: the parts' own scores of their proposals, where they give one."""
        if not eligible:
            self.none_chosen += 1
            return None
        scores = scores or {}
        rates = {part: self.rate(request_id, part, scores.get(part)) for part in eligible}
        best = max(eligible, key=lambda part: (rates[part], -self.parts.index(part)))
        if self.pass_seconds.weight and rates[best] <= 1.0 / self.pass_seconds.mean(0.0, 0.0):
            self.none_chosen += 1
            return None
        self.chosen[best] += 1
        return best

    # --- persistence ---------------------------------------------------------------------

    def state(self) -> dict:
        return {"window": {p: [f.total, f.weight] for p, f in self.window.items()},
                "draft_seconds": {p: [f.total, f.weight] for p, f in self.draft_seconds.items()},
                "pass_seconds": [self.pass_seconds.total, self.pass_seconds.weight],
                "scored": {p: [[f.total, f.weight] for f in bands] for p, bands in self.scored.items()},
                "drafted": {p: [f.total, f.weight] for p, f in self.drafted.items()},
                "predicted": {p: [f.total, f.weight] for p, f in self.predicted.items()}}

    def load_state(self, state: dict) -> None:
        for p, (total, weight) in state.get("window", {}).items():
            if p in self.window:
                self.window[p] = Faded(float(total), float(weight))
        for key in ("draft_seconds", "drafted", "predicted"):
            mine = getattr(self, key)
            for p, (total, weight) in state.get(key, {}).items():
                if p in mine:
                    mine[p] = Faded(float(total), float(weight))
        for p, bands in state.get("scored", {}).items():
            if p in self.window and len(bands) == len(SCORE_EDGES) + 1:
                self.scored[p] = [Faded(float(t), float(w)) for t, w in bands]
        if "pass_seconds" in state:
            total, weight = state["pass_seconds"]
            self.pass_seconds = Faded(float(total), float(weight))
