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

The engine sees every controller through one protocol, `Controller` (`choose` before a
step, `observe` after it): this adaptive one for chains, `TreeController`
(engine/tree_controller.py) for methods that draft trees, and `FixedController` when
`adaptive` is off. `make_controller` picks one from what the proposer class says of its
drafts (`Proposer.drafts_trees`, `Proposer.max_tree_depth`), never from the method's name.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from draftwise.config import SpeculativeConfig
from draftwise.engine.costs import MAX_EXPLORE_GAP, CostModel
from draftwise.verify import expected_tokens
from draftwise.engine.tree_controller import TreeController
from draftwise.request import RequestState
from draftwise.speculators import proposer_class

OPTIMISTIC_ALPHA = 0.9  # acceptance at which exploring a draft while speculation is off could pay


@runtime_checkable
class Controller(Protocol):
    """What the engine asks of a controller, once per speculative step."""

    def choose(self, requests: Sequence[RequestState]) -> list[int]:
        """The draft budget of each running request this step: a chain's length, or a tree's
        node count for a method that drafts trees; 0 is plain decoding."""
        ...

    def observe(self, batch: int, tokens_per_row: int, pass_seconds: float, draft_positions: int,
                draft_seconds: float) -> None:
        """What the step cost: a target pass over `batch` rows of `tokens_per_row` tokens (the
        fed token and the longest draft) took `pass_seconds`; drafting `draft_positions` tokens
        deep (the longest draft a speculator made) took `draft_seconds` (a draft model's prompt
        prefill left out). Acceptance the controller reads from the requests' stats."""
        ...


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

    def observe(self, batch: int, tokens_per_row: int, pass_seconds: float, draft_positions: int,
                draft_seconds: float) -> None:
        pass


def make_controller(config: SpeculativeConfig) -> Controller:
    """Chains: AdaptiveController; methods whose class drafts trees (`Proposer.drafts_trees`):
    TreeController (engine/tree_controller.py), as deep as the class says its trees go under
    `config` (`Proposer.max_tree_depth`); either FixedController when `adaptive` is false."""
    adaptive = config.adaptive if config.adaptive is not None else True
    if not adaptive:
        return FixedController(config.num_speculative_tokens)
    try:
        method = proposer_class(config.method)
    except ValueError:  # an unknown method is refused where the proposer is built
        return AdaptiveController(config.num_speculative_tokens)
    if method.drafts_trees:
        return TreeController(config.num_speculative_tokens, method.max_tree_depth(config))
    return AdaptiveController(config.num_speculative_tokens)
