"""One speculative step for a batch: propose -> one target pass -> verify -> commit.

Plain decoding is the same step with empty drafts. A constrained request (structured
output) carries the grammar's allowed-token mask of each of its rows (`allowed`; its draft
already fitted to the grammar, `constraints/draft.py`), applied to the target's logits
before verification. Row i of the pass feeds the request's
last committed token (the only one not yet in the cache) followed by its draft nodes;
a tree's nodes see the root and their ancestors only. After verification the accepted
path is kept in the cache (by index copy for a tree) and everything else is dropped by
not committing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from draftwise.cache import KVCache
from draftwise.models.transformer import SDPA_FROM, Transformer
from draftwise.request import RequestState
from draftwise.sampling import draft_depths, target_distribution, token_logprobs
from draftwise.speculators.base import Draft
from draftwise.verify import Verified, verify


@dataclass
class VerifyBatch:
    ids: torch.Tensor  # [batch, T] last token, then draft nodes, then padding
    positions: torch.Tensor  # [batch, T]
    tree_mask: torch.Tensor  # [batch, T, T] bool
    sizes: list[int]  # real tokens per row (1 + draft nodes)


def build_verify_batch(requests: Sequence[RequestState], draft: Draft, lengths: Sequence[int], device) -> VerifyBatch:
    sizes = [1 + len(t) for t in draft.tokens]
    b, t = len(requests), max(sizes)
    ids = torch.zeros(b, t, dtype=torch.long)
    positions = torch.zeros(b, t, dtype=torch.long)
    mask = torch.ones(t, t, dtype=torch.bool).tril().repeat(b, 1, 1)  # chains (and padding): causal
    for i, req in enumerate(requests):
        tokens, parents = draft.tokens[i], draft.parents[i]
        n = len(tokens)
        ids[i, 0] = req.output_ids[-1]
        ids[i, 1 : n + 1] = torch.tensor(tokens, dtype=torch.long)
        depth = draft_depths(parents, n)
        positions[i, : n + 1] = lengths[i] + torch.tensor([0] + depth)
        if parents is not None:
            tree = torch.eye(n + 1, dtype=torch.bool)
            tree[:, 0] = True
            for j, p in enumerate(parents):  # node j (index j+1) sees its parent's ancestors
                if p >= 0:
                    tree[j + 1] |= tree[p + 1]
            mask[i, : n + 1, : n + 1] = tree
    return VerifyBatch(ids.to(device), positions.to(device), mask.to(device), sizes)


def verify_rows(
    requests: Sequence[RequestState], draft: Draft, logits: torch.Tensor, sizes: Sequence[int],
    allowed: Sequence[torch.Tensor | None] | None = None,
) -> list[Verified]:
    """Verify each row's draft against the target logits `[batch, T, vocab]`; `allowed[i]`:
    request i's grammar mask `[n+1, vocab]` bool (None: unconstrained)."""
    results = []
    for i, req in enumerate(requests):
        n = sizes[i] - 1
        probs = target_distribution(
            logits[i, : n + 1], req.params, req.prompt_ids, req.output_ids, draft.tokens[i], draft.parents[i],
            req.banned, allowed[i] if allowed is not None else None,
        )  # [n+1, vocab]
        coupled = (req.noise_seed, len(req.output_ids), req.noise) if req.params.coupled else None
        res = verify(draft.tokens[i], draft.parents[i], draft.probs[i], probs, req.generator, req.params.greedy,
                     coupled)
        if req.params.logprobs is not None:  # rows that emitted: the root, then each accepted node
            emitted = logits[i, [0] + [1 + p for p in res.path]]
            res.logprobs = token_logprobs(emitted, res.tokens, req.params.logprobs)
        results.append(res)
    return results


def commit_cache(cache: KVCache, row: int, length: int, path: Sequence[int]) -> None:
    """Keep the fed last token (slot `length`) and the accepted nodes of `path`."""
    cache.keep_path(row, length, [length] + [length + 1 + p for p in path])


def rows_arg(requests: Sequence[RequestState], cache: KVCache, device) -> torch.Tensor | None:
    """Cache rows of the batch; None when they are 0..n-1 in order (no gather needed)."""
    rows = [r.row for r in requests]
    return None if rows == list(range(len(rows))) else torch.tensor(rows, device=device)


def target_step(
    model: Transformer, cache: KVCache, requests: Sequence[RequestState], draft: Draft,
    hidden_layers: Sequence[int] = (), allowed: Sequence[torch.Tensor | None] | None = None,
) -> tuple[list[Verified], list[dict[int, torch.Tensor]]]:
    """One target pass over every request's last token and draft; commits the cache.
    Also returns, per request, the hidden states of the tokens it kept. `allowed`: grammar
    masks per request (see `verify_rows`)."""
    rows = rows_arg(requests, cache, model.device)
    lengths = [int(cache.lengths[r.row]) for r in requests]
    batch = build_verify_batch(requests, draft, lengths, model.device)
    out = model(batch.ids, batch.positions, cache, tree_mask=batch.tree_mask, rows=rows,
                hidden_layers=hidden_layers)
    results = verify_rows(requests, draft, out.logits, batch.sizes, allowed)
    kept_hidden = []
    for i, (req, length, res) in enumerate(zip(requests, lengths, results)):
        commit_cache(cache, req.row, length, res.path)
        kept = torch.tensor([0] + [1 + p for p in res.path], device=model.device)
        kept_hidden.append({layer: h[i, kept] for layer, h in out.hidden.items()})
    return results, kept_hidden


def prefill_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Which prompts are prefilled together (indices into `lengths`).

    A prompt's cache and first token must not depend on what it shares a pass with, or
    greedy output would change with the batch (and speculation would not be lossless).
    Passes up to SDPA_FROM tokens compute each row the same whatever the batch, so short
    prompts go together; a longer pass takes the fused SDPA path, whose result depends on
    the padded length, so each long prompt runs alone.
    """
    short = [i for i, n in enumerate(lengths) if n <= SDPA_FROM]
    return ([short] if short else []) + [[i] for i, n in enumerate(lengths) if n > SDPA_FROM]


def prefill(
    model: Transformer, cache: KVCache, requests: Sequence[RequestState], hidden_layers: Sequence[int] = ()
) -> tuple[list[Verified], list[dict[int, torch.Tensor]]]:
    """Run the prompts (one row each) and emit each first token.
    Also returns, per request, the hidden states of its prompt tokens."""
    results: list[Verified | None] = [None] * len(requests)
    hidden: list[dict[int, torch.Tensor] | None] = [None] * len(requests)
    for group in prefill_groups([len(r.prompt_ids) for r in requests]):
        res, hid = _prefill_batch(model, cache, [requests[i] for i in group], hidden_layers)
        for i, r, h in zip(group, res, hid):
            results[i], hidden[i] = r, h
    return results, hidden  # type: ignore[return-value]


def _prefill_batch(
    model: Transformer, cache: KVCache, requests: Sequence[RequestState], hidden_layers: Sequence[int]
) -> tuple[list[Verified], list[dict[int, torch.Tensor]]]:
    rows = rows_arg(requests, cache, model.device)
    lens = [len(r.prompt_ids) for r in requests]
    t = max(lens)
    ids = torch.zeros(len(requests), t, dtype=torch.long)
    for i, r in enumerate(requests):
        ids[i, : lens[i]] = torch.tensor(r.prompt_ids, dtype=torch.long)
        cache.set_length(r.row, 0)
    positions = torch.arange(t).expand(len(requests), t)
    last = torch.tensor(lens)[:, None] - 1  # [batch, 1]
    out = model(ids.to(model.device), positions.to(model.device), cache, rows=rows,
                logits_at=last.to(model.device), hidden_layers=hidden_layers)
    empty = Draft.empty(len(requests))
    allowed = [r.constraint.allowed_after([]) if r.constraint is not None else None for r in requests]
    results = verify_rows(requests, empty, out.logits, [1] * len(requests), allowed)
    for r, n in zip(requests, lens):
        cache.set_length(r.row, n)
    hidden = [{layer: h[i, :n] for layer, h in out.hidden.items()} for i, n in enumerate(lens)]
    return results, hidden
