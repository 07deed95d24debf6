"""Verification: which draft tokens to keep, and which token to add after them.

The target scores the last committed token and every draft node in one pass; turned into
distributions by `draftwise.sampling.target_distribution`, row 0 is the target's
distribution after the committed prefix and row j+1 its distribution after draft node j.

Terms used throughout:

- accepted token: a draft token that verification keeps. Accepted tokens always form a
  path from the root down the draft (for a chain, a prefix of it).
- recovered token: when verification stops at a node because no child is accepted, the
  token it emits there instead, drawn from what is left of the target distribution once
  the rejected proposals are taken out (the residual).
- bonus token: when the accepted path reaches a node without children (for a chain: all
  draft tokens were accepted), the token drawn from the target's row after that node.

A step thus commits its accepted tokens plus exactly one recovered or bonus token.

Losslessness: with sampling, every committed token is distributed exactly as the target
distribution given the tokens before it, whatever the draft proposed; with greedy, the
committed tokens are exactly the target's argmax chain. The methods:

- greedy (chain or tree): follow the child whose token is the target's argmax, emit the
  argmax where no child matches.
- coupled (chain or tree, sampling with randomness keyed by position; see sampling.py):
  the same walk, with the target's choice at a row at output position t being
  argmax p(v) / E_t(v), E_t the position's Exp(1) noise. The committed tokens are then the
  tokens plain decoding samples with that seed, token for token, since the target's
  distributions are bit-identical across pass shapes; a point-mass candidate x is accepted
  with probability p(x), as by rejection sampling.
- chain with draft distributions q (speculative sampling, Leviathan et al. / Chen et al.
  2023): accept x with probability min(1, p(x) / q(x)); on rejection draw from
  normalize(max(0, p - q)); after the last accepted token draw the bonus from p.
- point-mass candidates (a chain without q, or any tree; recursive rejection sampling as
  in SpecInfer): at a node, try its children in order, each a deterministic candidate;
  accept candidate x with probability r(x) under the current residual r (initially p); on
  rejection remove x from r and renormalize. Descend into an accepted child; if none is
  accepted, draw the recovered token from the final residual. This equals sampling from p
  for any candidate set, so tree drafts made by sampling q are verified losslessly too.

Randomness comes only from the given `torch.Generator` (one uniform per draft node, drawn
up front, then one draw for the emitted token), or, when coupled, from the position noise;
greedy verification uses none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from draftwise.sampling import TokenLogprob, coupled_pick, draft_depths, position_noise, sample


@dataclass
class Verified:
    """Outcome of verifying one request's draft."""

    tokens: list[int]  # committed this step: accepted draft tokens, then one recovered or bonus token
    num_accepted: int  # how many draft tokens were accepted
    path: list[int]  # draft node indices of the accepted tokens (chain: 0..num_accepted-1)
    logprobs: list[TokenLogprob] | None = None  # one per committed token, when the request asks


def chain_parents(n: int) -> list[int]:
    """The parents of an n-node chain: node j hangs below node j-1 (the root for j = 0)."""
    return list(range(-1, n - 1))


def is_chain(parents: Sequence[int] | None) -> bool:
    return parents is None or all(p == j - 1 for j, p in enumerate(parents))


def children_of(parents: Sequence[int]) -> list[list[int]]:
    """children[row]: the nodes below row's node, in draft order (row 0 = root, row j+1 = node j)."""
    children: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for j, p in enumerate(parents):
        if not -1 <= p < j:
            raise ValueError(f"draft node {j} has parent {p}; parents must come before children")
        children[p + 1].append(j)
    return children


def residual(p: Tensor, q: Tensor) -> Tensor:
    """normalize(max(0, p - q)) for [vocab] rows; p itself where nothing is left (p <= q)."""
    r = (p - q).clamp_min(0.0)  # [vocab]
    total = r.sum()
    return torch.where(total > 0, r / total.clamp_min(torch.finfo(r.dtype).tiny), p)


def _without(p: Tensor, tokens: Sequence[int]) -> Tensor:
    """p with `tokens` removed (unnormalized; `sample` accepts weights); p where nothing is left."""
    if not tokens:
        return p
    r = p.clone()  # [vocab]
    r[torch.as_tensor(list(tokens), dtype=torch.long, device=p.device)] = 0.0
    return torch.where(r.sum() > 0, r, p)


def _draw(row: Tensor, generator: torch.Generator | None) -> int:
    return int(sample(row[None, :], generator)[0])


def _uniforms(n: int, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(n, generator=generator, device=device)  # [n]


def verify_greedy(draft_tokens: Sequence[int], parents: Sequence[int], target_probs: Tensor) -> Verified:
    """Keep the longest draft path that matches the target's argmax; then emit the argmax."""
    return _follow(draft_tokens, parents, target_probs.argmax(dim=-1).tolist())


def verify_coupled(draft_tokens: Sequence[int], parents: Sequence[int], target_probs: Tensor, seed: int,
                   position: int, noise_of: Callable[[int, int], Tensor] | None = None) -> Verified:
    """Keep the longest draft path that matches the target's choices under the position
    noise of `seed` (row 0 emits output position `position`, a node's row the next one
    below it); then emit the target's choice there. `noise_of(position, vocab)`: where the
    noise comes from when it is kept elsewhere (the request's cache); the same values as
    `position_noise(seed, position, vocab)`."""
    depths = [0] + draft_depths(parents, len(parents))  # row 0 is the root
    vocab = target_probs.shape[-1]
    noise: dict[int, Tensor] = {}  # rows at one depth share their position's noise
    best = []
    for row, d in enumerate(depths):
        if d not in noise:
            noise[d] = noise_of(position + d, vocab) if noise_of is not None else position_noise(
                seed, position + d, vocab, target_probs.device)
        best.append(coupled_pick(target_probs[row], seed, position + d, noise[d]))
    return _follow(draft_tokens, parents, best)


def _follow(draft_tokens: Sequence[int], parents: Sequence[int], best: Sequence[int]) -> Verified:
    """Walk down the draft along children whose token is the row's choice `best[row]`."""
    children = children_of(parents)
    path: list[int] = []
    row = 0
    while True:
        match = next((c for c in children[row] if draft_tokens[c] == best[row]), None)
        if match is None:
            break
        path.append(match)
        row = match + 1
    return Verified([draft_tokens[c] for c in path] + [best[row]], len(path), path)


def verify_chain(
    draft_tokens: Sequence[int], draft_probs: Tensor, target_probs: Tensor, generator: torch.Generator | None
) -> Verified:
    """Speculative sampling of a chain drawn from q = draft_probs [n, vocab]."""
    n = len(draft_tokens)
    if n == 0:
        return Verified([_draw(target_probs[0], generator)], 0, [])
    device = target_probs.device
    q = draft_probs.to(device=device, dtype=torch.float32)  # [n, vocab]
    rows = torch.arange(n, device=device)
    tokens = torch.as_tensor(list(draft_tokens), dtype=torch.long, device=device)  # [n]
    p_x = target_probs[rows, tokens]  # [n]
    q_x = q[rows, tokens]  # [n]
    u = _uniforms(n, generator).to(device)  # [n]
    accept = u * q_x < p_x  # u < p/q; q(x) = 0 accepts whenever p(x) > 0; p(x) = 0 never
    num = int(accept.int().cumprod(dim=0).sum())
    if num == n:
        last = _draw(target_probs[n], generator)
    else:
        last = _draw(residual(target_probs[num], q[num]), generator)
    return Verified(list(draft_tokens[:num]) + [last], num, list(range(num)))


def verify_candidates(
    draft_tokens: Sequence[int], parents: Sequence[int], target_probs: Tensor, generator: torch.Generator | None
) -> Verified:
    """Recursive rejection sampling with each draft node a point-mass candidate (chain or tree)."""
    n = len(draft_tokens)
    children = children_of(parents)
    p_x: list[float] = []  # p of each node's token at its parent's row
    u: list[float] = []  # one uniform per node: a node is tried at most once
    if n:
        device = target_probs.device
        parent_rows = torch.as_tensor([p + 1 for p in parents], dtype=torch.long, device=device)  # [n]
        tokens = torch.as_tensor(list(draft_tokens), dtype=torch.long, device=device)  # [n]
        p_x = target_probs[parent_rows, tokens].tolist()
        u = _uniforms(n, generator).tolist()
    path: list[int] = []
    row = 0
    while True:
        rejected: list[int] = []  # tokens taken out of this row's residual
        mass = 1.0  # mass left in the residual before renormalizing
        chosen = None
        for c in children[row]:
            x = draft_tokens[c]
            px = 0.0 if x in rejected else p_x[c]
            if u[c] * mass < px:  # accept with probability r(x) = px / mass
                chosen = c
                break
            rejected.append(x)
            mass -= px
        if chosen is None:
            last = _draw(_without(target_probs[row], rejected), generator)
            return Verified([draft_tokens[c] for c in path] + [last], len(path), path)
        path.append(chosen)
        row = chosen + 1


def verify(
    draft_tokens: Sequence[int],
    parents: Sequence[int] | None,
    draft_probs: Tensor | None,
    target_probs: Tensor,
    generator: torch.Generator | None,
    greedy: bool,
    coupled: tuple | None = None,
) -> Verified:
    """Verify one request's draft (chain when parents is None) against target_probs [n+1, vocab].

    draft_probs [n, vocab] (row j: the distribution node j was drawn from) is used for a
    chain only; tree nodes, and chains without it, are verified as point-mass candidates.
    coupled = (seed, output position of row 0[, noise_of]): sampled verification by position
    noise (`verify_coupled`).
    """
    n = len(draft_tokens)
    if target_probs.dim() != 2 or target_probs.shape[0] != n + 1:
        raise ValueError(f"target_probs {tuple(target_probs.shape)} do not match a draft of {n} tokens")
    if parents is not None and len(parents) != n:
        raise ValueError(f"{len(parents)} parents for {n} draft tokens")
    tree = list(parents) if parents is not None else chain_parents(n)
    if greedy:
        return verify_greedy(draft_tokens, tree, target_probs)
    if coupled is not None:
        return verify_coupled(draft_tokens, tree, target_probs, *coupled)
    if draft_probs is not None and is_chain(parents):
        if tuple(draft_probs.shape) != (n, target_probs.shape[1]):
            raise ValueError(f"draft_probs {tuple(draft_probs.shape)} do not match {n} tokens")
        return verify_chain(draft_tokens, draft_probs, target_probs, generator)
    return verify_candidates(draft_tokens, tree, target_probs, generator)


# --- what a step commits on average -------------------------------------------------------


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
