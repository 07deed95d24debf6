"""A lookup method's draft grafted onto a tree drafter's tree (`eagle` with `lookup`).

A learned head and a lookup method fail in different places. The head guesses new text
from the target's features but rarely a long verbatim span; prompt lookup (`ngram`) and
the suffix cache (`suffix`) copy spans seen before (code being edited, a passage being
summarized, a previous answer) and guess nothing elsewhere. One token tree can hold both
guesses: the lookup draft is merged into the head's tree node by node (a lookup token the
head also proposed at the same place is the same node), and the one verifying pass checks
both, within the step's node budget.

Which nodes a step keeps: the head keeps its best nodes by score, the sum of the head's
log-probabilities along the path. A grafted node at depth d scores d * log(a), with a the
lookup's measured acceptance rate for the request (tokens it guessed right over positions
it guessed, counted against the tokens the target committed, whether or not its nodes
were kept), pulled toward the rate over all requests while a request has few guesses of
its own. A node both propose keeps the higher score. As a < 1, a grafted node never
outscores its parent, so the best N nodes still form a tree.

Lossless whatever is grafted: tree nodes are verified as point-mass candidates (greedy:
follow the target's argmax; sampling: recursive rejection or the coupled noise; see
`draftwise.verify`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

from draftwise.request import RequestState
from draftwise.speculators.base import Draft, Proposer
from draftwise.tree import matched_path

PRIOR_TRIES = 4.0  # weight, in guessed positions, of the all-requests rate in a request's rate
MAX_RATE = 0.95  # a rate is never taken as certain: a grafted child stays below its parent


class ScoredTree(Protocol):
    """A draft tree under construction: parallel lists, parents before children."""

    tokens: list[int]
    parents: list[int]
    scores: list[float]

    def add(self, token: int, parent: int, score: float) -> int: ...


def graft(tree: ScoredTree, tokens: Sequence[int], parents: Sequence[int] | None, log_rate: float) -> None:
    """Merge a draft (a chain when `parents` is None; parents first) into `tree`: node j at
    depth d becomes the tree's child of its parent's node with that token, made if missing,
    scoring at least d * log_rate."""
    children = {(p, t): j for j, (p, t) in enumerate(zip(tree.parents, tree.tokens))}
    mapped: list[int] = []  # draft node -> tree node
    depth: list[int] = []
    for j, token in enumerate(tokens):
        p = j - 1 if parents is None else parents[j]
        at = mapped[p] if p >= 0 else -1
        d = depth[p] + 1 if p >= 0 else 1
        score = d * log_rate
        node = children.get((at, token))
        if node is None:
            node = tree.add(token, at, score)
            children[(at, token)] = node
        elif tree.scores[node] < score:
            tree.scores[node] = score
        mapped.append(node)
        depth.append(d)


@dataclass
class _Guess:
    tokens: list[int]
    parents: list[int] | None
    committed: int  # len(output_ids) when proposed


class LookupGraft:
    """The lookup proposer a tree drafter grafts from: its lifecycle, and its measured rate."""

    def __init__(self, lookup: Proposer) -> None:
        self.lookup = lookup
        self.hits = 0  # all requests: positions guessed right ...
        self.tries = 0  # ... of positions guessed
        self._rates: dict[str, list[int]] = {}  # request id -> [hits, tries]
        self._guesses: dict[str, _Guess] = {}

    def begin(self, request: RequestState) -> None:
        self.lookup.begin(request)
        self._rates[request.request_id] = [0, 0]

    def propose(self, requests: Sequence[RequestState], num_tokens: Sequence[int]) -> Draft:
        draft = self.lookup.propose(requests, num_tokens)
        for req, tokens, parents in zip(requests, draft.tokens, draft.parents):
            if tokens:
                self._guesses[req.request_id] = _Guess(list(tokens), parents, len(req.output_ids))
        return draft

    def log_rate(self, request: RequestState) -> float:
        every = (self.hits + 1) / (self.tries + 2)
        hits, tries = self._rates.get(request.request_id, (0, 0))
        rate = (hits + PRIOR_TRIES * every) / (tries + PRIOR_TRIES)
        return math.log(min(MAX_RATE, max(rate, 1e-6)))

    def on_accept(self, request: RequestState, num_accepted: int) -> None:
        self.lookup.on_accept(request, num_accepted)
        guess = self._guesses.pop(request.request_id, None)
        own = self._rates.get(request.request_id)
        if guess is None or own is None:
            return
        committed = request.output_ids[guess.committed:]
        path = matched_path(guess.tokens, guess.parents, committed)
        if len(path) == len(committed):  # right as far as the target went
            missed = False
        elif guess.parents is None:
            missed = len(path) < len(guess.tokens)
        else:  # it guessed the next position too, wrongly
            missed = (path[-1] if path else -1) in guess.parents
        tries = len(path) + int(missed)
        own[0] += len(path)
        own[1] += tries
        self.hits += len(path)
        self.tries += tries

    def end(self, request: RequestState) -> None:
        self.lookup.end(request)
        self._rates.pop(request.request_id, None)
        self._guesses.pop(request.request_id, None)

    def close(self) -> None:
        self.lookup.close()

    def report(self) -> dict[str, float]:
        return {"lookup_guessed": float(self.tries), "lookup_right": float(self.hits)}
