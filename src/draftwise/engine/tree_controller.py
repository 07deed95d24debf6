"""How many tree nodes to verify per step (eagle, medusa), from measured acceptance and costs.

Tree methods draft a token tree and the target verifies all its nodes in one pass. More
nodes give the longest accepted path more chances, but the pass grows with them, and a
deeper tree costs more head passes to draft. The controller chooses the node budget N of
the next step (one N for the batch; N = 0 is plain decoding) that maximises expected
committed tokens per second:

    rate(N) = batch x (1 + E[L | N]) / (pass(batch x (N + 1)) + draft(N))

- L is the accepted path length (bonus excluded). It is measured per budget, as
  acceptance per depth: a_j(N) = P(L >= j | N) / P(L >= j - 1 | N), from counts that fade
  (each observation weighs `DECAY` of the one before), so E[L | N] = sum_j prod_{i<=j} a_i
  follows the traffic. A budget not measured yet borrows the per-depth acceptance of the
  nearest measured budget, cut at its own depth (min(tree depth, N)), so a smaller tree
  is never read as better than a larger one that was seen;
- pass(n) is the measured time of a target pass over n tokens and draft(N) the measured
  drafting time at that budget (`CostModel`'s curves; an unmeasured draft cost is
  scaled from the nearest measured budget by depth).

Every `explore_every` steps the next budget up or down from the chosen one is tried, so
estimates stay current; while speculation is off, the smallest budget is tried now and
then (the wait doubles each time it does not pay, as for chains). When nothing accepts,
N = 0 wins: a draft that is never accepted only adds cost.
"""

from __future__ import annotations

from typing import Sequence

from draftwise.engine.costs import MAX_EXPLORE_GAP, CostModel, Curve
from draftwise.request import RequestState

DECAY = 0.99  # weight of past observations per new one (~100 steps of memory)
LADDER = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class TreeController:
    """Choose the tree node budget of each step from measurements (see the module docstring);
    an engine `Controller` (engine/controller.py). `depth`: the proposer's deepest tree path
    (`Proposer.max_tree_depth`), None for as deep as the budget."""

    def __init__(self, budget: int, depth: int | None = None, explore_every: int = 16) -> None:
        self.budget = budget
        self.depth = depth or budget
        self.candidates = sorted({n for n in LADDER if n < budget} | {budget}) if budget > 0 else []
        self.costs = CostModel()
        self.draft = {n: Curve() for n in self.candidates}  # drafting seconds by batch, per budget
        self.reached: dict[int, list[float]] = {}  # budget -> [depth j] faded count of steps with L >= j
        self.steps_seen: dict[int, float] = {}  # budget -> faded count of steps
        self.explore_every = explore_every
        self.explore_gap = explore_every
        self.next_explore = explore_every
        self.steps = 0
        self._chosen = 0
        self._before: dict[str, tuple[int, int, int]] = {}  # request id -> (budget, drafts, accepted)

    # --- acceptance ------------------------------------------------------------------------

    def tree_depth(self, n: int) -> int:
        return min(self.depth, n)

    def record(self, budget: int, accepted: int) -> None:
        """One verified step at `budget` nodes whose accepted path had `accepted` tokens."""
        depth = self.tree_depth(budget)
        reached = self.reached.setdefault(budget, [0.0] * depth)
        for j in range(depth):
            reached[j] = reached[j] * DECAY + (1.0 if accepted > j else 0.0)
        self.steps_seen[budget] = self.steps_seen.get(budget, 0.0) * DECAY + 1.0

    def acceptance(self, budget: int) -> list[float]:
        """a_1..a_depth at this budget: measured, else borrowed from the nearest measured budget."""
        measured = [n for n in self.candidates if self.steps_seen.get(n, 0.0) > 0]
        if not measured:
            return []
        source = min(measured, key=lambda n: (abs(n - budget), -n))
        steps, reached = self.steps_seen[source], self.reached[source]
        out, before = [], steps
        for j in range(min(self.tree_depth(budget), len(reached))):
            out.append(reached[j] / before if before > 0 else 0.0)
            before = reached[j]
        return out

    def expected_tokens(self, budget: int) -> float:
        """1 + E[L | budget] (the bonus token included)."""
        total, reach = 1.0, 1.0
        for a in self.acceptance(budget):
            reach *= a
            total += reach
        return total

    # --- costs -------------------------------------------------------------------------------

    def draft_cost(self, batch: int, budget: int) -> float:
        if budget == 0:
            return 0.0
        own = self.draft[budget].at(batch)
        if own is not None:
            return own
        measured = [n for n in self.candidates if self.draft[n].at(batch) is not None]
        if not measured:
            return 0.0
        near = min(measured, key=lambda n: abs(n - budget))
        return self.draft[near].at(batch) * self.tree_depth(budget) / self.tree_depth(near)

    def rate(self, batch: int, budget: int) -> float | None:
        cost = self.costs.pass_cost(batch * (budget + 1))
        if cost is None:
            return None
        tokens = self.expected_tokens(budget) if budget else 1.0
        return batch * tokens / (cost + self.draft_cost(batch, budget))

    # --- the engine's calls --------------------------------------------------------------------

    def choose(self, requests: Sequence[RequestState]) -> list[int]:
        self._learn(requests)
        self.steps += 1
        if not self.candidates:
            return self._chose(requests, 0)
        batch = len(requests)
        rates = {n: self.rate(batch, n) for n in [0, *self.candidates]}
        known = {n: r for n, r in rates.items() if r is not None}
        if not known or not any(self.steps_seen.values()):
            return self._chose(requests, self.budget)  # nothing measured yet: the configured budget
        best = max(known, key=known.__getitem__)
        if self.steps >= self.next_explore:
            self.next_explore = self.steps + (self.explore_gap if best == 0 else self.explore_every)
            if best == 0:
                best = self.candidates[0]
                self.explore_gap = min(2 * self.explore_gap, MAX_EXPLORE_GAP)
            else:
                self.explore_gap = self.explore_every
                i = self.candidates.index(best)
                side = [self.candidates[j] for j in (i - 1, i + 1) if 0 <= j < len(self.candidates)]
                best = side[self.steps // self.explore_every % len(side)] if side else best
        return self._chose(requests, best)

    def _chose(self, requests: Sequence[RequestState], budget: int) -> list[int]:
        self._chosen = budget
        self._before = {r.request_id: (budget, r.stats.drafts, r.stats.accepted_tokens) for r in requests}
        return [budget] * len(requests)

    def _learn(self, requests: Sequence[RequestState]) -> None:
        """Read what the last step accepted from the requests' stats."""
        for r in requests:
            before = self._before.get(r.request_id)
            if before is None:
                continue
            budget, drafts, accepted = before
            if budget > 0 and r.stats.drafts == drafts + 1:
                self.record(budget, r.stats.accepted_tokens - accepted)

    def observe(self, batch: int, tokens_per_row: int, pass_seconds: float, draft_positions: int,
                draft_seconds: float) -> None:
        self.costs.observe_pass(batch * tokens_per_row, pass_seconds)
        if self._chosen > 0 and draft_positions > 0:
            self.draft[self._chosen].observe(batch, draft_seconds)
