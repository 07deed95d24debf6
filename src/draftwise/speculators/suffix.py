"""Suffix-tree speculation ("suffix"), in the spirit of SuffixDecoding (Oliaro et al., 2024).

A `SuffixTree` counts every window of at most `depth` tokens starting anywhere in the
sequences it holds: the count of a node is how many windows pass through it, so the
counts of a node's children give the empirical distribution of the next token after that
context. Proposing = match the longest suffix of the request's context (at most
`suffix_max_depth` tokens) that occurs with a continuation, then expand the most likely
continuations best-first into a small draft tree (probability = product of child count
ratios along the path), up to the token budget.

Two trees are consulted per request, as SuffixDecoding does: the request's own tree
(its prompt and output so far, grown with each committed token) and a global tree of
finished requests (prompt + output, added in `end`, oldest evicted past
`suffix_max_cached_requests` or `max_cached_tokens`). The draft with the higher score
(sum of node probabilities = expected accepted tokens under the counts) wins.

Sharing (several engines, e.g. Ray Serve replicas; the `Proposer` hooks): with `share()`
on, every finished sequence is also left in `outbox` (`take_shared` empties it) for someone
to carry elsewhere, and sequences put in `inbox` (`adopt`: from other engines, by any
thread) join the global tree at the next `propose`, on the engine's thread, so the tree is
never touched by two threads.

The tree is path-compressed: an edge is a (sequence, start, length) label into the held
sequences, and a node exists only where paths branch or windows end, so a tree holds
O(tokens) nodes whatever the repetition. A window seen once ends in an *open leaf* that
reads on along its sequence, so it grows with a live sequence for free. Appending a token
moves only the windows still running along known paths (at most `depth`), O(1) each: a
window always ends at a node, and a node where it alone ends slides down the edge rather
than being re-created. One growing sequence per tree at a time (a request's own tree; a
finished request is inserted into the global tree in one go).
"""

from __future__ import annotations

import heapq
import queue
from array import array
from collections import deque
from operator import attrgetter
from typing import Any, Iterable, Sequence

from draftwise.config import SpeculativeConfig
from draftwise.request import RequestState
from draftwise.speculators.base import Draft, Learned, Proposer, Sharing, register


_NO_TOKENS = array("i")


class _Node:
    """End of a compressed edge. The edge spells seq[start : start + length] and begins at
    depth `top`; `count` windows pass through its end. length -1: an open leaf, the tail of
    a single window, which runs on along `seq` to that window's end (it grows with a live
    sequence for free)."""

    __slots__ = ("count", "top", "seq", "start", "length", "children")

    def __init__(self, count: int, top: int, seq: array, start: int, length: int) -> None:
        self.count = count
        self.top = top
        self.seq = seq
        self.start = start
        self.length = length
        self.children: dict[int, _Node] | None = None


class _Seq:
    """One sequence held by a tree, with the nodes where its still-growing windows end."""

    __slots__ = ("tokens", "active")

    def __init__(self) -> None:
        self.tokens = array("i")
        self.active: list[_Node] = []  # deepest first


Loc = tuple[_Node, int]  # a point of the trie: k tokens into the edge of a node (root: 0)
_count = attrgetter("count")


class SuffixTree:
    """Counts of all windows (<= depth tokens) of a set of sequences, path-compressed.

    Invariants: a node's count is the number of windows through its end; a running window
    always ends exactly at a node; an edge label (seq, start) is a real occurrence, so
    seq[start - top : start] spells the path above it.
    """

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.root = _Node(0, 0, _NO_TOKENS, 0, 0)
        self.root.children = {}
        self.num_nodes = 1

    def edge_len(self, node: _Node) -> int:
        if node.length >= 0:
            return node.length
        return min(len(node.seq) - node.start, self.depth - node.top)

    # --- updates -------------------------------------------------------------------------

    def extend(self, seq: _Seq, tokens: Iterable[int]) -> None:
        """Append tokens to `seq`: each window ending at the old end grows by one token.

        O(1) per running window (at most `depth`); a window that leaves the known paths
        retires into its own open leaf and costs nothing more.
        """
        toks, root, step, max_depth = seq.tokens, self.root, self._step, self.depth
        for t in tokens:
            toks.append(t)
            root.count += 1
            active: list[_Node] = []
            for node in (*seq.active, root):  # deepest first: see _step
                nxt = step(node, t, toks)
                if nxt is not None and nxt.top + nxt.length < max_depth:
                    active.append(nxt)
            seq.active = active

    def _step(self, node: _Node, t: int, toks: array) -> _Node | None:
        """Move a window ending at `node` one token `t` down; return its new end node."""
        kids = node.children
        child = kids.get(t) if kids else None
        depth = node.top + node.length
        if child is None:  # new path: the window retires into its own open leaf
            if kids is None:
                node.children = kids = {}
            kids[t] = _Node(1, depth, toks, len(toks) - 1, -1)
            self.num_nodes += 1
            return None
        clen = child.length if child.length >= 0 else self.edge_len(child)
        if node is not self.root and len(kids) == 1 and node.count == child.count + 1:
            # Only this window ends at `node` and the path goes on: slide the node one token
            # down the edge instead of making a new one (relabel it from the child's label).
            # A window that ended at `child` was deeper, so it has already moved this step.
            node.seq, node.start = child.seq, child.start - node.length
            node.length += 1
            if clen == 1:  # reached the child's end: absorb it
                node.children = child.children
                self.num_nodes -= 1
            else:
                child.top += 1
                child.start += 1
                if child.length > 0:
                    child.length -= 1
                node.children = {child.seq[child.start]: child}  # its first token moved on
            return node
        if clen == 1:
            child.count += 1
            child.length = 1  # closes an open leaf: a second window ends here
            return child
        # Split the child's edge after one token: a node of its own for this window.
        mid = _Node(child.count + 1, depth, child.seq, child.start, 1)
        child.top += 1
        child.start += 1
        if child.length > 0:
            child.length -= 1
        mid.children = {child.seq[child.start]: child}
        kids[t] = mid
        self.num_nodes += 1
        return mid

    def remove(self, seq: _Seq) -> None:
        """Forget every window of a finished sequence; re-compress and relabel what remains.

        First all its windows are subtracted, then the nodes they went through are repaired
        deepest first, so that no label is taken from a node still about to change.
        """
        toks = seq.tokens
        n = len(toks)
        self.root.count -= n
        touched: dict[int, tuple[int, _Node, int]] = {}  # id -> (end depth, node, a window start)
        for i in range(n):
            want = min(self.depth, n - i)
            node, depth = self.root, 0
            while depth < want:
                assert node.children is not None, "suffix tree out of sync"
                t = toks[i + depth]
                child = node.children[t]
                child.count -= 1
                if child.count == 0:
                    del node.children[t]
                    self.num_nodes -= self._drop(child)
                    break
                depth += self.edge_len(child)  # closed: open leaves hold a single window
                touched[id(child)] = (depth, child, i)
                node = child
        for _, node, i in sorted(touched.values(), key=lambda e: -e[0]):
            if node.count > 0:
                self._repair(node, toks, i)

    def _drop(self, node: _Node) -> int:
        """Mark a detached subtree dead; return its size."""
        node.count = 0
        return 1 + sum(self._drop(c) for c in (node.children or {}).values())

    def _repair(self, node: _Node, toks: array, start: int) -> None:
        """After a removal through `node`: merge a lone equal-count child, drop labels in toks.

        Children are repaired already, so none is labelled in toks; a leaf labelled in toks
        gets a private copy of its path (window `start` went through it).
        """
        kids = node.children
        if kids is not None and not kids:
            node.children = kids = None
        if kids is not None and len(kids) == 1:
            (child,) = kids.values()
            if child.count == node.count:  # no window ends at node any more
                node.seq, node.start = child.seq, child.start - node.length
                node.length = -1 if child.length < 0 else node.length + child.length
                node.children = child.children
                self.num_nodes -= 1
                kids = node.children
        if node.seq is toks:  # keep no reference to the forgotten sequence
            for child in (kids or {}).values():
                if child.seq is not toks:
                    node.seq, node.start = child.seq, child.start - node.length
                    return
            end = node.top + node.length  # closed here: an open leaf would have gone with toks
            node.seq, node.start = array("i", toks[start : start + end]), node.top

    # --- queries -------------------------------------------------------------------------

    def locate(self, pattern: Sequence[int]) -> Loc | None:
        """The trie point spelled by `pattern`, or None if no window contains it."""
        node, k = self.root, 0
        for t in pattern:
            if k < self.edge_len(node):
                if node.seq[node.start + k] != t:
                    return None
                k += 1
            else:
                child = node.children.get(t) if node.children else None
                if child is None:
                    return None
                node, k = child, 1
        return node, k

    def has_next(self, loc: Loc) -> bool:
        node, k = loc
        return k < self.edge_len(node) or bool(node.children)

    def next_tokens(self, loc: Loc, limit: int, min_prob: float = 0.0) -> list[tuple[int, float, Loc]]:
        """Up to `limit` continuations of `loc` with probability >= min_prob, best first:
        (token, conditional probability = count / sum of sibling counts, next point)."""
        node, k = loc
        if k < self.edge_len(node):
            return [(node.seq[node.start + k], 1.0, (node, k + 1))]
        kids = node.children
        if not kids or limit <= 0:
            return []
        total = sum(map(_count, kids.values()))
        best = heapq.nlargest(limit, kids.values(), key=_count) if len(kids) > limit else kids.values()
        return [
            (c.seq[c.start], c.count / total, (c, 1)) for c in best if c.count >= min_prob * total
        ]

    def longest_match(self, context: Sequence[int], max_len: int) -> tuple[Loc, int] | None:
        """Longest suffix of `context` (<= max_len tokens) that occurs followed by a token.

        Suffix-closed (a shorter suffix occurs wherever a longer one does), so binary search.
        """
        best: tuple[Loc, int] | None = None
        lo, hi = 1, min(max_len, len(context), self.depth - 1)
        while lo <= hi:
            m = (lo + hi) // 2
            loc = self.locate(context[len(context) - m :])
            if loc is not None and self.has_next(loc):
                best, lo = (loc, m), m + 1
            else:
                hi = m - 1
        return best

    def draft(self, loc: Loc, budget: int, min_prob: float) -> tuple[list[int], list[int], list[float], bool]:
        """Best-first draft tree from `loc`, nodes of path probability >= min_prob.

        Returns tokens, parents (-1 = child of the root), path probabilities, and whether
        the tree ran out of continuations (rather than of budget or probability).
        """
        tokens: list[int] = []
        parents: list[int] = []
        probs: list[float] = []
        heap = [(-p, tie, -1, t, nxt) for tie, (t, p, nxt) in enumerate(self.next_tokens(loc, budget, min_prob))]
        tie = len(heap)
        heapq.heapify(heap)
        while heap and len(tokens) < budget:
            neg_p, _, parent, t, nxt = heapq.heappop(heap)
            if -neg_p < min_prob:
                return tokens, parents, probs, False
            idx = len(tokens)
            tokens.append(t)
            parents.append(parent)
            probs.append(-neg_p)
            room = budget - len(tokens)
            for t2, p2, nxt2 in self.next_tokens(nxt, room, min_prob / -neg_p):
                heapq.heappush(heap, (neg_p * p2, tie, idx, t2, nxt2))
                tie += 1
        return tokens, parents, probs, not heap


@register
class SuffixProposer(Proposer):
    """Propose the most frequent continuations of the context from per-request and global trees."""

    name = "suffix"

    def __init__(
        self,
        max_depth: int = 64,
        max_spec_tokens: int = 16,
        max_cached_requests: int = 10000,
        max_cached_tokens: int = 1_000_000,
        min_prob: float = 0.1,
        spec_factor: float = 1.0,
        spec_offset: float = 0.0,
    ) -> None:
        self.max_depth = max_depth
        # Windows must hold a full match plus a full draft behind it.
        self.tree_depth = max_depth + max(1, max_spec_tokens)
        self.max_cached_requests = max_cached_requests
        self.max_cached_tokens = max_cached_tokens
        self.min_prob = min_prob
        self.spec_factor = spec_factor  # draft at most spec_factor * match length + spec_offset
        self.spec_offset = spec_offset
        self.global_tree = SuffixTree(self.tree_depth)
        self._cached: deque[_Seq] = deque()
        self._cached_tokens = 0
        self._local: dict[str, tuple[SuffixTree, _Seq]] = {}
        self.outbox: deque[list[int]] | None = None  # finished sequences for other engines (share())
        self.inbox: queue.SimpleQueue[list[int]] = queue.SimpleQueue()  # theirs, added at the next propose

    def share(self, keep: int = 1000) -> Sharing:
        """Leave every finished sequence (prompt + output) in `outbox` (the newest `keep`)."""
        self.outbox = deque(maxlen=keep)
        return Sharing(sequences=True)

    def take_shared(self) -> Learned:
        """The finished sequences left in `outbox` since the last call."""
        out = Learned()
        while self.outbox:
            out.sequences.append(self.outbox.popleft())
        return out

    def adopt(self, sequences: Sequence[list[int]] = (), learner: dict | None = None) -> None:
        """Other engines' finished sequences join the global tree at the next `propose`."""
        for seq in sequences:
            self.inbox.put(seq)

    @classmethod
    def from_config(cls, config: SpeculativeConfig, target: Any = None) -> "SuffixProposer":
        return cls(
            max_depth=config.suffix_max_depth,
            max_spec_tokens=config.num_speculative_tokens,
            max_cached_requests=config.suffix_max_cached_requests,
        )

    # --- lifecycle -----------------------------------------------------------------------

    def begin(self, request: RequestState) -> None:
        self._local.pop(request.request_id, None)
        self._sync(request)

    def on_accept(self, request: RequestState, num_accepted: int) -> None:
        self._sync(request)

    def end(self, request: RequestState) -> None:
        self._local.pop(request.request_id, None)
        tokens = request.prompt_ids + request.output_ids
        if self.outbox is not None:
            self.outbox.append(tokens)
        self.remember(tokens)

    def remember(self, tokens: list[int]) -> None:
        """Add a finished sequence to the global tree (evicting the oldest past the limits)."""
        if self.max_cached_requests <= 0 or self.max_cached_tokens <= 0:
            return
        seq = _Seq()
        self.global_tree.extend(seq, tokens)
        seq.active = []  # finished: no window grows any more
        self._cached.append(seq)
        self._cached_tokens += len(seq.tokens)
        while self._cached and (
            len(self._cached) > self.max_cached_requests or self._cached_tokens > self.max_cached_tokens
        ):
            old = self._cached.popleft()
            self.global_tree.remove(old)
            self._cached_tokens -= len(old.tokens)

    def propose(self, requests: Sequence[RequestState], num_tokens: Sequence[int]) -> Draft:
        while not self.inbox.empty():
            self.remember(self.inbox.get_nowait())
        draft = Draft.empty(len(requests))
        draft.scores = [0.0] * len(requests)
        for i, (request, k) in enumerate(zip(requests, num_tokens)):
            if k <= 0:
                continue
            tree, seq = self._sync(request)
            tokens, parents, draft.scores[i] = self.speculate(seq.tokens, k, tree)
            draft.tokens[i] = tokens
            is_chain = all(p == j - 1 for j, p in enumerate(parents))
            draft.parents[i] = None if is_chain else parents
        return draft

    # --- internals -----------------------------------------------------------------------

    def _sync(self, request: RequestState) -> tuple[SuffixTree, _Seq]:
        """The request's own tree, extended with its newly committed tokens."""
        entry = self._local.get(request.request_id)
        total = len(request.prompt_ids) + len(request.output_ids)
        if entry is None or total < len(entry[1].tokens):  # unknown, or history shrank
            entry = (SuffixTree(self.tree_depth), _Seq())
            self._local[request.request_id] = entry
        tree, seq = entry
        done, n_prompt = len(seq.tokens), len(request.prompt_ids)
        if done < n_prompt:
            tree.extend(seq, request.prompt_ids[done:])
            done = n_prompt
        if done < total:
            tree.extend(seq, request.output_ids[done - n_prompt :])
        return entry

    def speculate(self, context: Sequence[int], budget: int,
                  local: SuffixTree | None) -> tuple[list[int], list[int], float]:
        """Best-scoring draft tree over the local and global trees: (tokens, parents, score),
        score = the sum of its nodes' path probabilities, the accepted tokens the counts expect."""
        best: tuple[float, list[int], list[int]] = (0.0, [], [])
        for tree in (local, self.global_tree):
            if tree is None:
                continue
            match = tree.longest_match(context, self.max_depth)
            if match is None:
                continue
            loc, length = match
            while True:
                limit = min(budget, int(self.spec_factor * length + self.spec_offset))
                if limit <= 0:
                    break
                tokens, parents, probs, exhausted = tree.draft(loc, limit, self.min_prob)
                score = sum(probs)
                if score > best[0]:
                    best = (score, tokens, parents)
                # The continuations of a long match can run into the end of their sequence
                # (e.g. the period of a repetitive output): then retry a shorter suffix,
                # which has more (and earlier) occurrences. At most log2(match) retries.
                length //= 2
                if not exhausted or len(tokens) >= limit or length == 0:
                    break
                found = tree.locate(context[len(context) - length :])
                if found is None:
                    break
                loc = found
        return best[1], best[2], best[0]
