"""`eagle`: an EAGLE head drafts a dynamic token tree (EAGLE-2 style) from target features.

Per request the head keeps its own KV cache (one row per engine row) over *pairs*
(target feature of token i, token i+1), in step with the committed tokens: the engine
hands over the target's hidden states of every token it ran (`on_hidden`), and before
drafting the head runs the pairs it has not seen yet, accepted draft tokens included (re-run
with the target's true features, as EAGLE does). Its output after the last pair
predicts the first draft token.

The tree (EAGLE-2): the top-k tokens of that prediction form depth 1; then, once per
further depth, the k best frontier nodes (score = product of draft probabilities along
the path, kept as a sum of log-probabilities) are run through the head in one pass with
a tree mask (each sees the committed pairs, its ancestors and itself), and each proposes
its top-k children. All nodes made are re-ranked by score and the best N are kept; a
child never outscores its parent, so the kept set is a tree, emitted parents first.
Verification keeps the output exact whatever the head proposes: greedy follows the
target's argmax, sampling uses recursive rejection over these point-mass candidates.

Settings (`SpeculativeConfig`): `eagle_tree_top_k` (k), `eagle_tree_depth`,
`eagle_total_tokens` (N, default and maximum: the engine's budget, i.e.
`num_speculative_tokens`), and `lookup` (`ngram` or `suffix`: that method's draft is
grafted onto the tree before the best N are kept; `eagle/graft.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from draftwise.cache import KVCache
from draftwise.config import SpeculativeConfig
from draftwise.errors import BadInput
from draftwise.request import RequestState
from draftwise.speculators.base import Draft, Proposer, Target, proposer_class, register
from draftwise.speculators.eagle.checkpoint import check_against_target, load_eagle_head
from draftwise.speculators.eagle.head import EagleHead, target_features, with_kernels
from draftwise.speculators.eagle.graft import LookupGraft, graft

LONG_CATCH_UP = 16  # rows with more unseen pairs than this (a prompt) catch up on their own


@dataclass
class _Row:
    seen: int = 0  # pairs in the head cache (pair i = feature of token i, token i+1)
    pending: list[torch.Tensor] = field(default_factory=list)  # features of tokens seen.. [n, F]
    last: torch.Tensor | None = None  # the head's output after pair seen-1 [H]


@dataclass
class _Tree:
    """Nodes made while drafting one request, in creation order (parents first)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # head-cache slot once run, else -1

    def add(self, token: int, parent: int, score: float) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append(score)
        self.slots.append(-1)
        return len(self.tokens) - 1

    def ancestors(self, node: int) -> list[int]:
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out

    def best(self, n: int) -> tuple[list[int], list[int]]:
        """The n best-scored nodes as (tokens, parents), parents first. Ties go to the earlier
        node, and a child never outscores its parent, so every kept node's parent is kept."""
        ranked = sorted(range(len(self.tokens)), key=lambda i: (-self.scores[i], i))[:n]
        keep = sorted(ranked)
        index = {old: new for new, old in enumerate(keep)}
        return [self.tokens[i] for i in keep], [index[self.parents[i]] if self.parents[i] >= 0 else -1 for i in keep]


@register
class EagleProposer(Proposer):
    name = "eagle"
    drafts_trees = True

    def __init__(self, head: EagleHead, target, max_batch_size: int, max_model_len: int,
                 top_k: int = 4, depth: int = 5, total_tokens: int | None = None,
                 lookup: Proposer | None = None) -> None:
        check_against_target(head.config, target, "given")
        # drafting runs a copy on the target's own kernels (packed / quantized projections)
        self.head = with_kernels(head.to(device=target.device, dtype=target.dtype).eval(),
                                 getattr(target, "quantization", "none"))
        self.target = target
        self.layers = head.config.resolved_layers(target.config.num_hidden_layers)
        self.hidden_layers = tuple(sorted(set(self.layers)))
        self.top_k, self.depth, self.total_tokens = min(top_k, head.config.draft_vocab_size), depth, total_tokens
        attn = head.layer.self_attn
        self.capacity = max_model_len + depth * top_k + 2
        self.cache = KVCache(1, max_batch_size, attn.kv_heads, attn.head_dim, self.capacity, target.dtype,
                             target.device)
        self.rows: dict[str, _Row] = {}
        # first-token accuracy on committed tokens, per request (read by the adaptive speculator)
        self.track_hits = False
        self.hits: dict[str, list[int]] = {}  # request id -> [correct, predicted] since last taken
        self.lookup = LookupGraft(lookup) if lookup is not None else None

    @classmethod
    def max_tree_depth(cls, config: SpeculativeConfig) -> int | None:
        return config.eagle_tree_depth

    @classmethod
    def from_config(cls, config: SpeculativeConfig, target: Target) -> "EagleProposer":
        if isinstance(target.draft_model, EagleHead):
            head = target.draft_model
        elif config.model:
            head = load_eagle_head(config.model, target.model)
        else:
            raise BadInput("speculator eagle needs a head: --draft-model NAME|DIR (a shipped head such as "
                           "smollm2-135m-eagle, an EAGLE / EAGLE-3 checkpoint folder, or one written by "
                           "`draftwise train eagle`)")
        lookup = None
        if config.lookup is not None:
            lookup = proposer_class(config.lookup).from_config(config, target)
        return cls(head, target.model, target.max_batch_size, target.max_model_len, config.eagle_tree_top_k,
                   config.eagle_tree_depth, config.eagle_total_tokens, lookup)

    # --- lifecycle ----------------------------------------------------------------------

    def begin(self, request: RequestState) -> None:
        self.rows[request.request_id] = _Row()
        if self.lookup is not None:
            self.lookup.begin(request)

    def on_accept(self, request: RequestState, num_accepted: int) -> None:
        if self.lookup is not None:
            self.lookup.on_accept(request, num_accepted)

    def end(self, request: RequestState) -> None:
        self.rows.pop(request.request_id, None)
        self.hits.pop(request.request_id, None)
        if self.lookup is not None:
            self.lookup.end(request)

    def close(self) -> None:
        if self.lookup is not None:
            self.lookup.close()

    def report(self) -> dict[str, float]:
        return self.lookup.report() if self.lookup is not None else {}

    def set_head(self, head: EagleHead) -> None:
        """Draft with `head` from the next step on (a drafting copy of a head of the same shape,
        e.g. from `with_kernels`). The head cache keeps the pairs the old head ran: they
        only shape proposals, which verification makes harmless."""
        self.head = head

    def catch_up(self, requests: Sequence[RequestState]) -> float:
        """Run the pairs committed since the last draft, without drafting (keeps `hits` current).
        Returns the seconds spent on prompts (as `Draft.prefill_seconds`)."""
        reqs = [r for r in requests if r.request_id in self.rows and self.rows[r.request_id].pending]
        if not reqs:
            return 0.0
        with torch.inference_mode():
            return self._catch_up(reqs)[1]

    def take_hits(self, request: RequestState) -> tuple[int, int]:
        """(correct, predicted) first-token guesses on committed tokens since the last call."""
        correct, total = self.hits.pop(request.request_id, [0, 0])
        return correct, total

    def on_hidden(self, request: RequestState, hidden: dict[int, torch.Tensor]) -> None:
        row = self.rows.get(request.request_id)
        if row is not None:
            row.pending.append(target_features(self.head.config, self.target, hidden, self.layers))

    # --- drafting -----------------------------------------------------------------------

    def propose(self, requests: Sequence[RequestState], num_tokens: Sequence[int]) -> Draft:
        draft = Draft.empty(len(requests))
        active = [i for i, k in enumerate(num_tokens) if k > 0 and requests[i].request_id in self.rows]
        if not active:
            return draft
        reqs = [requests[i] for i in active]
        budgets = [num_tokens[i] for i in active]
        keep = [min(b, self.total_tokens or b) for b in budgets]  # nodes verified per request
        with torch.inference_mode():
            root, draft.prefill_seconds = self._catch_up(reqs)  # [n, H]
            trees = self._grow(reqs, keep, root)
        if self.lookup is not None:
            extra = self.lookup.propose(reqs, budgets)
            for req, tree, tokens, parents in zip(reqs, trees, extra.tokens, extra.parents):
                graft(tree, tokens, parents, self.lookup.log_rate(req))
        for i, tree, m in zip(active, trees, keep):
            draft.tokens[i], draft.parents[i] = tree.best(m)
        return draft

    def _logprobs(self, out: torch.Tensor) -> torch.Tensor:
        """Head outputs [..., H] -> log-probabilities over the draft vocabulary [..., Vd], <= 0."""
        logits = self.head.logits(out, self.target.head_weight)
        return logits.float().log_softmax(-1).clamp(max=0.0)

    def _catch_up(self, reqs: list[RequestState]) -> tuple[torch.Tensor, float]:
        """Run every request's unseen pairs. Returns the head's output after the last one
        [n, H], and the seconds spent on prompts (a request's first catch-up, once per
        request like a draft model's prefill: not a cost of the step's draft)."""
        pending = [sum(f.shape[0] for f in self.rows[r.request_id].pending) for r in reqs]
        short = [j for j, p in enumerate(pending) if 0 < p <= LONG_CATCH_UP]
        groups = ([short] if short else []) + [[j] for j, p in enumerate(pending) if p > LONG_CATCH_UP]
        prompt_seconds = 0.0
        for g in groups:
            first = pending[g[0]] > LONG_CATCH_UP and self.rows[reqs[g[0]].request_id].seen == 0  # a prompt: alone
            start = time.perf_counter()
            self._run_pending([reqs[j] for j in g])
            if first:
                prompt_seconds += time.perf_counter() - start
        last = [self.rows[r.request_id].last for r in reqs]
        if any(h is None for h in last):
            raise RuntimeError("eagle: drafting for a request before any target hidden states arrived")
        return torch.stack(last), prompt_seconds  # type: ignore[arg-type]

    def _run_pending(self, reqs: list[RequestState]) -> None:
        """Run the unseen pairs of `reqs` (each has some) into the head cache."""
        head, dev = self.head, self.head.device
        feats = [torch.cat(self.rows[r.request_id].pending) for r in reqs]  # [P, F] each
        counts = [f.shape[0] for f in feats]
        n, t = len(reqs), max(counts)
        feat = feats[0].new_zeros(n, t, feats[0].shape[-1])  # [n, T, F]
        ids = torch.zeros(n, t, dtype=torch.long)
        starts = []
        for j, r in enumerate(reqs):
            row = self.rows[r.request_id]
            nxt = r.all_ids[row.seen + 1: row.seen + 1 + counts[j]]  # token i+1 of pair i
            if len(nxt) != counts[j]:
                raise RuntimeError(f"eagle: {counts[j]} new features but {len(nxt)} new tokens")
            feat[j, : counts[j]] = feats[j]
            ids[j, : counts[j]] = torch.tensor(nxt)
            starts.append(row.seen)
        positions = (torch.tensor(starts)[:, None] + torch.arange(t)).to(dev)  # [n, T]
        slots = positions.clamp(max=self.capacity - 1)  # only padding can reach past the end
        keys = torch.arange(int(slots.max()) + 1, device=dev)
        mask = (keys[None, None, :] <= slots[:, :, None])[:, None]  # [n, 1, T, S] causal
        emb = head.embed(ids.to(dev), self.target.model.embed_tokens)
        x = head.stream_input(feat, emb, fused=True)
        rows = torch.tensor([r.row for r in reqs], device=dev)
        out = head.forward_cached(x, emb, positions, self.cache, rows, slots, mask)  # [n, T, H]
        if self.track_hits:
            self._count_hits(reqs, counts, starts, out)
        for j, (r, c) in enumerate(zip(reqs, counts)):
            row = self.rows[r.request_id]
            row.seen += c
            row.pending = []
            row.last = out[j, c - 1].clone()

    def _count_hits(self, reqs: list[RequestState], counts: list[int], starts: list[int],
                    out: torch.Tensor) -> None:
        """Would the head's top guess after pair i have been token i+2? For the pairs whose
        token i+2 is an output token committed already (prompt text is not what it drafts)."""
        for j, (r, c, s) in enumerate(zip(reqs, counts, starts)):
            ids = r.all_ids
            a = max(0, len(r.prompt_ids) - (s + 2))  # first pair predicting an output token
            n = min(c, len(ids) - (s + 2))
            if n <= a:
                continue
            logits = self.head.logits(out[j, a:n], self.target.head_weight)  # argmax: no softmax needed
            guess = self.head.to_target(logits.argmax(-1)).tolist()
            correct = sum(g == t for g, t in zip(guess, ids[s + 2 + a: s + 2 + n]))
            got = self.hits.setdefault(r.request_id, [0, 0])
            got[0] += correct
            got[1] += n - a

    def _grow(self, reqs: list[RequestState], keep: list[int], root: torch.Tensor) -> list[_Tree]:
        """The dynamic tree of each request, grown for `keep[i]` kept nodes; all nodes made
        are returned (the caller keeps the best)."""
        head = self.head
        n = len(reqs)
        ks = [min(self.top_k, m) for m in keep]
        depths = [min(self.depth, m) for m in keep]
        kmax = max(ks)
        seen = [self.rows[r.request_id].seen for r in reqs]
        trees = [_Tree() for _ in range(n)]
        top = self._logprobs(root).topk(kmax, dim=-1)  # [n, kmax]
        tokens = head.to_target(top.indices).tolist()
        scores = top.values.tolist()
        frontier = [[trees[j].add(tokens[j][r], -1, scores[j][r]) for r in range(ks[j])] for j in range(n)]
        inputs = root[:, None, :].expand(n, kmax, root.shape[-1])  # [n, kmax, H] parent outputs
        for d in range(2, max(depths) + 1):
            live = [j for j in range(n) if depths[j] >= d]
            out = self._run_frontier([reqs[j] for j in live], [trees[j] for j in live],
                                     [frontier[j] for j in live], inputs[live], [seen[j] for j in live], d, kmax)
            top = self._logprobs(out).topk(kmax, dim=-1)  # [m, kmax, kmax]
            child_tokens = head.to_target(top.indices).tolist()
            child_lp = top.values.tolist()
            next_inputs = out.new_zeros(len(live), kmax, out.shape[-1])
            for m, j in enumerate(live):
                tree, k = trees[j], ks[j]
                made = []
                for t, node in enumerate(frontier[j]):
                    for r in range(k):
                        c = tree.add(child_tokens[m][t][r], node, tree.scores[node] + child_lp[m][t][r])
                        made.append((c, t))
                made.sort(key=lambda ct: (-tree.scores[ct[0]], ct[0]))
                frontier[j] = [c for c, _ in made[:k]]
                next_inputs[m, : len(frontier[j])] = out[m, [t for _, t in made[:k]]]
            full = next_inputs.new_zeros(n, kmax, out.shape[-1])
            full[live] = next_inputs
            inputs = full
        return trees

    def _run_frontier(self, reqs, trees: list[_Tree], frontier: list[list[int]], inputs: torch.Tensor,
                      seen: list[int], depth: int, kmax: int) -> torch.Tensor:
        """One head pass over the frontier nodes (at depth-1) of each live request: their output
        features [m, kmax, H], from which depth `depth` is drawn. Node t of a row goes to slot
        seen + (depth-2)*kmax + t."""
        head, dev = self.head, self.head.device
        m = len(reqs)
        ids = torch.zeros(m, kmax, dtype=torch.long)
        base = torch.tensor(seen)[:, None] + (depth - 2) * kmax
        slots = base + torch.arange(kmax)  # [m, kmax]
        s = int(slots.max()) + 1
        mask = torch.arange(s)[None, None, :] < torch.tensor(seen)[:, None, None]  # [m, 1, S] committed
        mask = mask.expand(m, kmax, s).clone()  # [m, kmax, S]
        for j in range(m):
            tree = trees[j]
            for t, node in enumerate(frontier[j]):
                ids[j, t] = tree.tokens[node]
                tree.slots[node] = int(slots[j, t])
                mask[j, t, [tree.slots[a] for a in tree.ancestors(node)]] = True
            for t in range(len(frontier[j]), kmax):  # padding: sees its own slot only
                mask[j, t, int(slots[j, t])] = True
        positions = torch.tensor(seen)[:, None].expand(m, kmax) + depth - 2  # depth-1 nodes: pair index `seen`
        emb = head.embed(ids.to(dev), self.target.model.embed_tokens)
        x = head.stream_input(inputs, emb, fused=False)
        rows = torch.tensor([r.row for r in reqs], device=dev)
        return head.forward_cached(x, emb, positions.to(dev), self.cache, rows, slots.to(dev), mask[:, None].to(dev))
