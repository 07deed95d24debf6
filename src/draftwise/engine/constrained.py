"""The engine's side of constraints: compile a request's constraint, fit each step's draft
to the grammars of the constrained rows, and count what the grammar forced.

Unconstrained rows pass through untouched (their draft, no mask), so a batch may mix rows
with different grammars and rows with none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from draftwise.constraints import FittedDraft, Matcher, compile_constraint, fit_draft
from draftwise.request import RequestState
from draftwise.speculators.base import Draft
from draftwise.tree import matched_length
from draftwise.verify import Verified

# forced tokens a step may add beyond the speculator's budget (they need no drafting and are
# nearly always accepted; each takes one cache slot of verification width)
FORCED_MAX = 16


def constraint_for(params, tokenizer, model_config) -> Matcher | None:
    """A fresh matcher for the request's structured_outputs (BadInput if it does not compile)."""
    spec = params.structured_outputs
    if spec is None:
        return None
    return Matcher(compile_constraint(spec, tokenizer, model_config.vocab_size, model_config.eos_token_ids))


@dataclass
class FittedBatch:
    draft: Draft  # the drafts verified (constrained rows fitted to their grammar)
    allowed: list[torch.Tensor | None]  # per row: the grammar's mask [n+1, vocab], None when unconstrained
    original: Draft  # the speculator's own drafts (what its on_accept counts against)
    fits: list[FittedDraft | None]


def fit_batch(requests: Sequence[RequestState], draft: Draft, limits: Sequence[int]) -> FittedBatch:
    """Fit each constrained row's draft to its grammar, at most `limits[i]` nodes."""
    if all(r.constraint is None for r in requests):
        return FittedBatch(draft, [None] * len(requests), draft, [None] * len(requests))
    out = Draft([list(t) for t in draft.tokens], list(draft.parents), list(draft.probs), draft.prefill_seconds)
    allowed: list[torch.Tensor | None] = [None] * len(requests)
    fits: list[FittedDraft | None] = [None] * len(requests)
    for i, req in enumerate(requests):
        if req.constraint is None:
            continue
        fit = fit_draft(req.constraint, draft.tokens[i], draft.parents[i], draft.probs[i], max(0, limits[i]))
        out.tokens[i], out.parents[i], out.probs[i] = fit.tokens, fit.parents, fit.probs
        allowed[i], fits[i] = fit.allowed, fit
    return FittedBatch(out, allowed, draft, fits)


def own_accepted(batch: FittedBatch, i: int, res: Verified) -> int:
    """How many of the speculator's own draft tokens (before fitting) are now committed as it
    drafted them: the count its `on_accept` expects."""
    if batch.fits[i] is None:
        return res.num_accepted
    return matched_length(batch.original.tokens[i], batch.original.parents[i], res.tokens[: res.num_accepted])


def count_forced(req: RequestState, batch: FittedBatch, i: int, res: Verified) -> None:
    """Add the row's forced draft tokens, and those accepted, to the request's stats."""
    fit = batch.fits[i]
    if fit is None or not fit.forced:
        return
    on_path = set(res.path)
    req.stats.forced_drafted += len(fit.forced)
    req.stats.forced_tokens += sum(1 for j in fit.forced if j in on_path)
