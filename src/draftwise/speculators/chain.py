"""What the chain drafters (draft_model, layer_skip, mtp) share: the drafting loop, the
draft distribution, and the bookkeeping of a drafter's own KV cache.

`draft_chain` is the loop, written once: at each depth the drafter gives its logits after
the tokens so far of the requests still drafting, and each of those requests draws its
next token from them under its own sampling settings (`RequestState.draw`: the argmax when
greedy, the position's noise when coupled, else its generator), until its budget is spent.

`CacheBook` is the bookkeeping of a drafter that keeps its own cache in step with the
committed tokens: the cache holds `seen` committed tokens of a request, plus the draft
tokens it ran in the last step, which are all drafted tokens but the last (that one was
proposed, never fed back). After verification it keeps those the target accepted.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from draftwise.request import RequestState
from draftwise.sampling import target_distribution
from draftwise.speculators.base import Draft


def draft_distribution(req: RequestState, logits: torch.Tensor, drafted: list[int],
                       vocab: int | None = None) -> torch.Tensor:
    """The drafter's distribution `[vocab]` under the request's sampling settings (one-hot
    at the penalized argmax when greedy), with the drafted tokens as extra history.
    `vocab`: the target's vocabulary size, when the drafter's logits are padded to another."""
    logits = logits.float()
    if vocab is not None and logits.shape[-1] != vocab:  # embedding tables padded to different sizes
        fixed = logits.new_full((vocab,), float("-inf"))
        n = min(vocab, logits.shape[-1])
        fixed[:n] = logits[:n]
        logits = fixed
    return target_distribution(logits[None], req.params, req.prompt_ids, req.output_ids + drafted)[0]


def draft_chain(requests: Sequence[RequestState], num_tokens: Sequence[int],
                next_logits: Callable[[int, list[int], Draft], torch.Tensor], vocab: int | None = None) -> Draft:
    """Draft a chain of up to num_tokens[i] tokens for each request.

    `next_logits(depth, live, draft)` -> [len(live), vocab]: the drafter's logits after the
    committed tokens and the `depth` tokens drafted so far, for requests `live` (indices into
    `requests`, those still drafting). With sampling, the draft keeps each token's
    distribution for verification (`Draft.probs`)."""
    draft = Draft.empty(len(requests))
    probs: dict[int, list[torch.Tensor]] = {i: [] for i, k in enumerate(num_tokens) if k > 0}
    live = list(probs)
    depth = 0
    while live:
        logits = next_logits(depth, live, draft)
        for j, i in enumerate(live):
            req = requests[i]
            q = draft_distribution(req, logits[j], draft.tokens[i], vocab)  # [vocab]
            draft.tokens[i].append(req.draw(q, ahead=len(draft.tokens[i])))
            probs[i].append(q)
        live = [i for i in live if len(draft.tokens[i]) < num_tokens[i]]
        depth += 1
    for i, qs in probs.items():
        if qs and not requests[i].params.greedy:
            draft.probs[i] = torch.stack(qs)  # [k, vocab]
    return draft


class CacheBook:
    """Per request: committed tokens in a drafter's own cache (`seen`), and draft tokens it
    ran in the last step (see the module docstring)."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self._ran: dict[str, int] = {}

    def begin(self, request_id: str) -> None:
        self.seen[request_id] = 0

    def end(self, request_id: str) -> None:
        self.seen.pop(request_id, None)
        self._ran.pop(request_id, None)

    def drafted(self, requests: Sequence[RequestState], draft: Draft) -> None:
        """The drafter proposed `draft` for `requests` and ran all its tokens but the last."""
        for req, tokens in zip(requests, draft.tokens):
            if tokens:
                self._ran[req.request_id] = len(tokens) - 1

    def accept(self, request_id: str, num_accepted: int) -> int:
        """The target kept `num_accepted` draft tokens: the committed tokens the cache holds now."""
        self.seen[request_id] += min(num_accepted, self._ran.pop(request_id, 0))
        return self.seen[request_id]
