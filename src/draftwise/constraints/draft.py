"""A speculator's draft, fitted to a request's grammar before verification.

Given a draft (a chain, or a tree as `parents`) and the request's matcher:
- nodes the grammar forbids are cut, with everything below them: they cost no
  verification width;
- forced tokens join the draft as free tokens: the root's forced tokens go first (the
  speculator's chain is kept after them only where it spelled them too, since it drafted
  from the root), and a chain's end gets the forced tokens of the state it reaches;
- the allowed-token mask of every row is returned, so that the verifier compares against
  the target's constrained distribution (row 0 after the committed tokens, row j+1 after
  node j, as in `verify.py`).

Draft distributions (a draft model's q, chains only): a kept node's token was drawn from
q, but kept only because the grammar allows it, so its row becomes q restricted to the
allowed tokens and renormalized (what the kept token is in fact distributed as); a forced
token's row is a point mass. Speculative sampling against the constrained target is then
exact. Trees and chains without q are verified as point-mass candidates, exact for any
candidate set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from draftwise.constraints.matcher import Matcher


@dataclass
class FittedDraft:
    tokens: list[int]
    parents: list[int] | None  # None: a chain
    probs: Tensor | None  # [len(tokens), vocab] or None
    allowed: Tensor  # [len(tokens)+1, vocab] bool: the grammar's mask at each verification row
    forced: list[int]  # indices of the nodes the grammar forced (not the speculator's)


def fit_draft(matcher: Matcher, tokens: Sequence[int], parents: Sequence[int] | None, probs: Tensor | None,
              limit: int) -> FittedDraft:
    """The draft cut and extended by the grammar, at most `limit` nodes (see the module
    docstring). The matcher is left in the state it was in."""
    if parents is not None and tokens:
        return _fit_tree(matcher, list(tokens), list(parents), limit)
    return _fit_chain(matcher, list(tokens), probs, limit)


def _fit_chain(m: Matcher, draft: list[int], probs: Tensor | None, limit: int) -> FittedDraft:
    mask = m.new_mask(limit + 1)
    out: list[int] = []
    source: list[int] = []  # per kept node: its row in `probs`, or -1 when forced
    rooted = m.forced()[:limit]  # the root's forced tokens
    # the speculator drafted from the root: its chain stays after the forced tokens only where it spelled them
    own = draft if not rooted else (draft[len(rooted):] if draft[: len(rooted)] == rooted else [])
    offset = len(draft) - len(own)  # index in `draft` of own[0]
    for t in rooted:  # point masses (also where the speculator spelled them: kept because they match)
        m.fill(mask, len(out))
        m.push(t)
        out.append(t)
        source.append(-1)
    for j, t in enumerate(own):
        if len(out) >= limit:
            break
        m.fill(mask, len(out))
        if not m.allows(mask, len(out), t):
            break
        m.push(t)
        out.append(t)
        source.append(offset + j)
    for t in m.forced()[: limit - len(out)]:  # the forced continuation of where the draft ends
        m.fill(mask, len(out))
        m.push(t)
        out.append(t)
        source.append(-1)
    m.fill(mask, len(out))
    m.pop(len(out))
    allowed = m.unpack(mask[: len(out) + 1])
    forced = [i for i, s in enumerate(source) if s < 0]
    return FittedDraft(out, None, _fit_probs(probs, source, out, allowed), allowed, forced)


def _fit_probs(probs: Tensor | None, source: list[int], tokens: list[int], allowed: Tensor) -> Tensor | None:
    if probs is None or not tokens:
        return None
    rows = []
    for i, (s, t) in enumerate(zip(source, tokens)):
        if s < 0:
            row = torch.zeros(probs.shape[-1], dtype=probs.dtype, device=probs.device)
            row[t] = 1.0
        else:
            keep = allowed[i, : probs.shape[-1]].to(probs.device)
            row = probs[s] * keep
            row = row / row.sum()
        rows.append(row)
    return torch.stack(rows)  # [n, vocab]


def _fit_tree(m: Matcher, tokens: list[int], parents: list[int], limit: int) -> FittedDraft:
    rooted = m.forced()
    if rooted:  # the tree was drafted from the root, before the forced tokens: use those instead
        return _fit_chain(m, [], None, limit)
    children: list[list[int]] = [[] for _ in range(len(tokens) + 1)]
    for j, p in enumerate(parents):
        children[p + 1].append(j)
    mask = m.new_mask(len(tokens) + 1)  # rows by original node (row 0: root, j+1: node j)
    keep = [False] * len(tokens)
    budget = [min(limit, len(tokens))]

    def visit(row: int) -> None:
        m.fill(mask, row)
        for c in children[row]:
            if budget[0] == 0 or not m.allows(mask, row, tokens[c]):
                continue  # cut, with its subtree
            budget[0] -= 1
            keep[c] = True
            m.push(tokens[c])
            visit(c + 1)
            m.pop(1)

    visit(0)
    kept = [j for j in range(len(tokens)) if keep[j]]  # original (parent-first) order
    index = {j: i for i, j in enumerate(kept)}
    new_parents = [index[parents[j]] if parents[j] >= 0 else -1 for j in kept]
    allowed = m.unpack(mask[[0] + [j + 1 for j in kept]])
    return FittedDraft([tokens[j] for j in kept], new_parents, None, allowed, [])
