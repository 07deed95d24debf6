"""How many tokens to speculate, per step and request, from measured costs.

The controller picks the draft length k that maximises expected output tokens per second
for the running batch. Two things are measured, not assumed:

- acceptance: per request and draft position j, the chance a_j that the token at j is
  accepted given the ones before it were: accepted at j / (accepted at j + rejected at j),
  an estimate that does not depend on the draft lengths tried (tokens after a rejection
  were never tested). Each position's prior is the estimate of the position before (the
  first: 0.5), fading as evidence comes in, so unmeasured positions are read as i.i.d.
  A step that drafts k tokens commits 1 + a_1 + a_1 a_2 + ... + a_1...a_k tokens on
  average, bonus included. Per position is meant for copying methods (prompt lookup,
  suffix), whose drafts are accepted in runs: once the first token is right the rest
  usually are, which one pooled rate blurs (measured on a Spec-Bench sample with ngram on
  the 1.5B: the same speed as the pooled rate, within this machine's noise);
- cost: the wall time of target passes by number of tokens in the pass (batch x (k+1)),
  and of one draft pass by batch size; a draft of k tokens makes k + 1 draft passes
  (catching up on the tokens committed last step is one more), so short drafts are not
  charged as if they cost more per token. Both are running averages of what the engine
  timed (the first measurement of a new size is a warm-up: kernels are set up for the
  shape, so the second replaces it). Until a size has been seen, its cost is
  interpolated from the sizes that have, extended along the slope of the two largest
  above them (so that longer drafts get tried, and measured, when passes are memory
  bound), and scaled down in proportion below the smallest (so that a shorter pass, k = 0
  on a large batch above all, gets tried and measured rather than assumed to cost as much
  as the shortest one seen).

k = 0 (plain decoding) is always a candidate, so speculation is switched off when it
does not pay: low acceptance, or a batch so large that verification costs more than it
saves. While it is off, a step with k = 1 now and then keeps acceptance measured, but
only when drafting could pay at a high acceptance (`OPTIMISTIC_ALPHA`): on a batch too
large for any draft to pay, exploring would only cost throughput. Each exploration that
leaves speculation off doubles the wait before the next (from `explore_every` steps up
to `MAX_EXPLORE_GAP`), so a settled "off" costs little.
"""

from __future__ import annotations

import bisect
from typing import Sequence

from draftwise.config import SpeculativeConfig
from draftwise.request import RequestState

OPTIMISTIC_ALPHA = 0.9  # acceptance at which exploring a draft while speculation is off could pay
MAX_EXPLORE_GAP = 256  # steps between explorations at most


def expected_tokens(alpha: float | Sequence[float], k: int) -> float:
    """Mean tokens committed by a step that drafts k tokens (bonus included), for an
    acceptance rate alpha at every position, or per position (a_1, a_2, ...)."""
    if not isinstance(alpha, (int, float)):
        total, reach = 1.0, 1.0
        for a in alpha[:k]:
            reach *= a
            total += reach
        return total
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class Curve:
    """Running averages of a cost by size, read between and beyond the sizes measured."""

    def __init__(self, smoothing: float = 0.2) -> None:
        self.smoothing = smoothing
        self.values: dict[int, float] = {}  # size -> seconds
        self.seen: dict[int, int] = {}  # size -> times measured

    def observe(self, size: int, seconds: float) -> None:
        n = self.seen.get(size, 0)
        self.seen[size] = n + 1
        old = self.values.get(size)
        self.values[size] = seconds if n < 2 else (1 - self.smoothing) * old + self.smoothing * seconds

    def at(self, size: int) -> float | None:
        """Seconds at `size`; None before any measurement."""
        v = self.values
        if not v:
            return None
        if size in v:
            return v[size]
        sizes = sorted(v)
        i = bisect.bisect_left(sizes, size)
        if i == 0:  # below what was seen: optimistic, so it gets measured
            return v[sizes[0]] * size / sizes[0]
        if i == len(sizes):  # beyond what was seen: the slope of the two largest sizes
            big = sizes[-1]
            if len(sizes) == 1:
                return v[big]
            prev = sizes[-2]
            slope = max(0.0, (v[big] - v[prev]) / (big - prev))
            return v[big] + slope * (size - big)
        lo, hi = sizes[i - 1], sizes[i]
        w = (size - lo) / (hi - lo)
        return (1 - w) * v[lo] + w * v[hi]


class CostModel:
    """Measured step costs (seconds): target passes by tokens in the pass, draft passes by batch."""

    def __init__(self, smoothing: float = 0.2) -> None:
        self.passes = Curve(smoothing)
        # drafting seconds per draft pass; a step that drafts k tokens makes k + 1 passes
        # (first catching the draft up on the tokens committed last step, then k positions)
        self.drafts = Curve(smoothing)

    def observe_pass(self, tokens: int, seconds: float) -> None:
        self.passes.observe(tokens, seconds)

    def observe_draft(self, batch: int, positions: int, seconds: float) -> None:
        if positions > 0:
            self.drafts.observe(batch, seconds / (positions + 1))

    def pass_cost(self, tokens: int) -> float | None:
        """Seconds of a target pass over `tokens` tokens; None before any measurement."""
        return self.passes.at(tokens)

    def draft_cost(self, batch: int, k: int) -> float:
        """Seconds of drafting k tokens for `batch` requests (0 before any measurement)."""
        per_pass = self.drafts.at(batch)
        return (per_pass or 0.0) * (k + 1) if k else 0.0


class AdaptiveController:
    """Choose one draft length for the batch; requests that rarely accept get none."""

    def __init__(self, k_max: int, prior: float = 0.5, prior_weight: float = 4.0, explore_every: int = 16) -> None:
        self.k_max = k_max
        self.prior, self.prior_weight = prior, prior_weight
        self.costs = CostModel()
        self.explore_every = explore_every
        self.explore_gap = explore_every  # steps to the next exploration while speculation is off
        self.next_explore = explore_every
        self.steps = 0

    def acceptance(self, req: RequestState) -> list[float]:
        """Estimated a_1..a_kmax of the request (see the module docstring)."""
        s = req.stats
        out, prior = [], self.prior
        for j in range(self.k_max):
            acc = s.accepted_per_position[j] if j < len(s.accepted_per_position) else 0
            rej = s.rejected_per_position[j] if j < len(s.rejected_per_position) else 0
            prior = (acc + prior * self.prior_weight) / (acc + rej + self.prior_weight)
            out.append(prior)
        return out

    def rate(self, alphas: Sequence[float | Sequence[float]], k: int) -> float | None:
        """Expected committed tokens per second for the batch at draft length k."""
        cost = self.costs.pass_cost(len(alphas) * (k + 1))
        if cost is None:
            return None
        return sum(expected_tokens(a, k) for a in alphas) / (cost + self.costs.draft_cost(len(alphas), k))

    def choose(self, requests: Sequence[RequestState]) -> list[int]:
        self.steps += 1
        alphas = [self.acceptance(r) for r in requests]
        rates = {k: self.rate(alphas, k) for k in range(self.k_max + 1)}
        known = {k: r for k, r in rates.items() if r is not None}
        if not known:  # nothing measured yet: start at the configured length
            return [self.k_max] * len(requests)
        best = max(known, key=known.__getitem__)
        if best > 0:
            self.explore_gap = self.explore_every
        elif self.steps >= self.next_explore:
            self.next_explore = self.steps + self.explore_gap
            if self._could_pay(len(requests), known[0]):
                best = 1  # keep measuring acceptance now and then, or it could never recover
                self.explore_gap = min(2 * self.explore_gap, MAX_EXPLORE_GAP)
        return [best] * len(requests)

    def _could_pay(self, batch: int, plain_rate: float) -> bool:
        """Would drafting beat plain decoding for this batch if acceptance were high?"""
        optimistic = self.rate([OPTIMISTIC_ALPHA] * batch, 1)
        return optimistic is not None and optimistic > plain_rate

    def observe(self, batch: int, tokens_per_row: int, pass_seconds: float, draft_positions: int,
                draft_seconds: float) -> None:
        self.costs.observe_pass(batch * tokens_per_row, pass_seconds)
        self.costs.observe_draft(batch, draft_positions, draft_seconds)


class FixedController:
    """Always the configured draft length."""

    def __init__(self, k: int) -> None:
        self.k = k

    def choose(self, requests: Sequence[RequestState]) -> list[int]:
        return [self.k] * len(requests)

    def observe(self, *args, **kwargs) -> None:
        pass


TREE_METHODS = ("eagle", "medusa")  # num_speculative_tokens counts tree nodes, not a chain


def make_controller(config: SpeculativeConfig) -> AdaptiveController | FixedController:
    adaptive = config.adaptive if config.adaptive is not None else config.method not in TREE_METHODS
    if adaptive:
        return AdaptiveController(config.num_speculative_tokens)
    return FixedController(config.num_speculative_tokens)
