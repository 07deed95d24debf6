"""Suffix-tree proposer: counts, matching, draft trees, caching and eviction."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from draftwise.config import SpeculativeConfig
from draftwise.request import RequestState
from draftwise.sampling import SamplingParams
from draftwise.speculators.base import proposer_class
from draftwise.speculators.suffix import SuffixProposer, SuffixTree, _Seq


def make_request(prompt: list[int], output: list[int] | None = None, rid: str = "r") -> RequestState:
    return RequestState(request_id=rid, prompt_ids=list(prompt), params=SamplingParams(temperature=0.0, max_tokens=128), output_ids=list(output or []))


def finish(proposer: SuffixProposer, prompt: list[int], output: list[int], rid: str) -> None:
    req = make_request(prompt, output, rid)
    proposer.begin(req)
    proposer.end(req)


def window_counts(seqs: list[list[int]], depth: int) -> Counter:
    """Brute force: how many windows (<= depth tokens) of the sequences start with each string."""
    counts: Counter = Counter()
    for s in seqs:
        for i in range(len(s)):
            for n in range(1, min(depth, len(s) - i) + 1):
                counts[tuple(s[i : i + n])] += 1
    return counts


def tree_counts(tree: SuffixTree) -> Counter:
    """Every string the tree spells, with its count; checks the structural invariants."""
    counts: Counter = Counter()
    stack = [(tree.root, ())]
    while stack:
        node, prefix = stack.pop()
        kids = node.children or {}
        assert sum(c.count for c in kids.values()) <= node.count or node is tree.root
        for t, child in kids.items():
            n = tree.edge_len(child)
            assert n >= 1 and child.count >= 1 and child.top == len(prefix)
            assert child.top + n <= tree.depth
            if child.length < 0:  # open leaf: a single window's tail
                assert child.count == 1 and child.children is None
            # the label is a real occurrence: the path above it precedes it in its sequence
            assert child.start >= child.top
            assert tuple(child.seq[child.start - child.top : child.start]) == prefix
            edge = tuple(child.seq[child.start : child.start + n])
            assert edge[0] == t
            for j in range(1, n + 1):
                counts[prefix + edge[:j]] += child.count
            stack.append((child, prefix + edge))
    return counts


def all_nodes(tree: SuffixTree) -> list:
    out, stack = [], [tree.root]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend((node.children or {}).values())
    return out


def check_tree(tokens: list[int], parents: list[int] | None, budget: int) -> None:
    assert len(tokens) <= budget
    if parents is None:
        return
    assert len(parents) == len(tokens)
    seen = set()
    for j, par in enumerate(parents):
        assert -1 <= par < j  # parent before child
        assert (par, tokens[j]) not in seen  # siblings carry distinct tokens
        seen.add((par, tokens[j]))


def paths(tokens: list[int], parents: list[int] | None) -> list[list[int]]:
    parents = parents if parents is not None else list(range(-1, len(tokens) - 1))
    out = []
    for j in range(len(tokens)):
        path, k = [], j
        while k != -1:
            path.append(tokens[k])
            k = parents[k]
        out.append(path[::-1])
    return out


def occurs(needle: list[int], hay: list[int]) -> bool:
    n = len(needle)
    return any(hay[i : i + n] == needle for i in range(len(hay) - n + 1))


def test_registered_and_from_config() -> None:
    cfg = SpeculativeConfig(method="suffix", num_speculative_tokens=6, suffix_max_depth=16, suffix_max_cached_requests=3)
    p = proposer_class("suffix").from_config(cfg, None)
    assert isinstance(p, SuffixProposer)
    assert (p.max_depth, p.tree_depth, p.max_cached_requests) == (16, 22, 3)


def test_cross_request_learning() -> None:
    p = SuffixProposer(max_depth=16, max_spec_tokens=8)
    finish(p, [1, 2, 3], [20, 21, 22, 23, 24, 25, 26], "a")
    req = make_request([9, 9, 20, 21, 22], rid="b")
    p.begin(req)
    draft = p.propose([req], [4])
    assert draft.tokens == [[23, 24, 25]]  # at most match length (3) tokens by default
    assert draft.parents == [None] and draft.probs == [None]
    long = SuffixProposer(max_depth=16, max_spec_tokens=8, spec_factor=4.0)
    finish(long, [1, 2, 3], [20, 21, 22, 23, 24, 25, 26], "a")
    assert long.propose([req], [4]).tokens == [[23, 24, 25, 26]]


def test_learns_from_own_repetitive_output() -> None:
    p = SuffixProposer(max_depth=16, max_spec_tokens=8)
    req = make_request([50, 51, 52])
    p.begin(req)
    assert p.propose([req], [4]).tokens == [[]]
    req.output_ids += [7, 8, 9, 7, 8, 9, 7, 8]
    p.on_accept(req, 3)
    # longest earlier match: 7 8 9 7 8 (at 3), whose continuation runs up to the end
    assert p.propose([req], [4]).tokens == [[9, 7, 8]]
    req.output_ids += [9, 7, 8]
    p.on_accept(req, 3)
    assert p.propose([req], [4]).tokens == [[9, 7, 8, 9]]


def test_branching_tree() -> None:
    p = SuffixProposer(max_depth=8, max_spec_tokens=8, spec_factor=10.0, min_prob=0.05)
    for rid, out in (("a", [1, 2, 3, 5, 6]), ("b", [1, 2, 3, 5, 6]), ("c", [1, 2, 3, 4, 8])):
        finish(p, [0], out, rid)
    req = make_request([9, 1, 2, 3], rid="q")
    p.begin(req)
    draft = p.propose([req], [4])
    tokens, parents = draft.tokens[0], draft.parents[0]
    check_tree(tokens, parents, 4)
    assert tokens == [5, 6, 4, 8]  # 2/3, 2/3, 1/3, 1/3: best first
    assert parents == [-1, 0, -1, 2]


def test_eviction_bound_and_counts() -> None:
    p = SuffixProposer(max_depth=8, max_spec_tokens=4, max_cached_requests=2)
    seqs = [[0, 30, 31, 32, 33], [0, 40, 41, 42, 43], [0, 50, 51, 52, 53]]
    for j, s in enumerate(seqs):
        finish(p, s[:1], s[1:], f"r{j}")
    assert len(p._cached) == 2
    assert tree_counts(p.global_tree) == window_counts(seqs[1:], p.tree_depth)
    req = make_request([30, 31, 32], rid="q")
    p.begin(req)
    assert p.propose([req], [2]).tokens == [[]]  # the oldest request was evicted
    req2 = make_request([40, 41, 42], rid="q2")
    p.begin(req2)
    assert p.propose([req2], [2]).tokens == [[43]]


def test_token_budget_and_disabled_cache() -> None:
    p = SuffixProposer(max_depth=8, max_cached_tokens=12)
    for j in range(5):
        finish(p, [j], list(range(100, 105)), f"r{j}")
    assert p._cached_tokens <= 12 and len(p._cached) == 2
    off = SuffixProposer(max_cached_requests=0)
    finish(off, [1, 2], [3, 4], "x")
    assert not off._cached and not off.global_tree.root.children


def test_end_frees_request_state() -> None:
    p = SuffixProposer()
    reqs = [make_request([1, 2, 3], rid=str(j)) for j in range(3)]
    for r in reqs:
        p.begin(r)
    p.propose(reqs, [3, 3, 3])
    assert len(p._local) == 3
    for r in reqs:
        p.end(r)
    assert not p._local


def test_own_tree_counts_incremental() -> None:
    rng = random.Random(1)
    p = SuffixProposer(max_depth=6, max_spec_tokens=3)
    req = make_request([rng.randrange(3) for _ in range(20)])
    p.begin(req)
    for _ in range(10):
        req.output_ids += [rng.randrange(3) for _ in range(rng.randrange(1, 4))]
        p.on_accept(req, 0)
        p.propose([req], [3])
        tree, seq = p._local["r"]
        assert list(seq.tokens) == req.all_ids
        assert tree_counts(tree) == window_counts([req.all_ids], p.tree_depth)


@settings(max_examples=60, deadline=None)
@given(
    seqs=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=25), min_size=1, max_size=6),
    removals=st.lists(st.integers(0, 5), max_size=6),
    depth=st.integers(1, 7),
)
def test_tree_counts_match_brute_force(seqs: list[list[int]], removals: list[int], depth: int) -> None:
    tree = SuffixTree(depth)
    held = []
    for s in seqs:
        h = _Seq()
        tree.extend(h, s[: len(s) // 2])
        tree.extend(h, s[len(s) // 2 :])
        held.append((h, s))
    assert tree_counts(tree) == window_counts(seqs, depth)
    assert tree.num_nodes == len(all_nodes(tree))
    for r in removals:
        if held:
            h, _ = held.pop(r % len(held))
            tree.remove(h)
            assert tree_counts(tree) == window_counts([s for _, s in held], depth)
            nodes = all_nodes(tree)
            assert tree.num_nodes == len(nodes)
            assert all(node.seq is not h.tokens for node in nodes)  # nothing keeps it alive
    assert tree.root.count == sum(len(s) for _, s in held)


@settings(max_examples=60, deadline=None)
@given(
    seqs=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=30), min_size=1, max_size=5),
    context=st.lists(st.integers(0, 3), min_size=1, max_size=20),
    budget=st.integers(1, 8),
)
def test_proposed_paths_occurred_after_match(seqs: list[list[int]], context: list[int], budget: int) -> None:
    max_depth = 5
    p = SuffixProposer(max_depth=max_depth, max_spec_tokens=8, spec_factor=8.0, min_prob=0.0)
    for j, s in enumerate(seqs):
        finish(p, s[:1], s[1:], f"f{j}")
    for tree, hay in ((p.global_tree, seqs), (None, [])):
        if tree is None:  # the request's own tree: the context itself is the cache
            own = make_request(context, rid="own")
            tree, _ = p._sync(own)
            hay = [context]
        match = tree.longest_match(context, max_depth)
        # brute force longest suffix that occurs followed by a token
        best = 0
        for m in range(1, min(max_depth, len(context)) + 1):
            if any(occurs(context[-m:], s[:-1]) for s in hay):
                best = m
        assert (match[1] if match else 0) == best
        if match is None:
            continue
        loc, m = match
        tokens, parents, probs, _ = tree.draft(loc, budget, 0.0)
        check_tree(tokens, parents, budget)
        assert all(0.0 < q <= 1.0 for q in probs)
        for path in paths(tokens, parents):
            assert any(occurs(context[-m:] + path, s) for s in hay)
    # the proposer's own choice: every path continues some suffix of the context somewhere
    req = make_request(context, rid="q")
    draft = p.propose([req], [budget])
    check_tree(draft.tokens[0], draft.parents[0], budget)
    for path in paths(draft.tokens[0], draft.parents[0]):
        assert any(occurs(context[-1:] + path, s) for s in seqs + [context])


def test_repeats_stay_linear_in_nodes() -> None:
    rng = random.Random(0)
    tree = SuffixTree(80)
    seg = [rng.randrange(10) for _ in range(300)]
    tree.extend(_Seq(), seg * 4)  # one sequence repeating itself
    for _ in range(4):  # and the same text again as other sequences
        tree.extend(_Seq(), seg)
    assert tree.num_nodes == len(all_nodes(tree))
    # an uncompressed trie would hold ~ 300 x 80 nodes for the repeated windows
    assert tree.num_nodes <= 2 * 2400
    assert tree_counts(tree) == window_counts([seg * 4] + [seg] * 4, 80)


def test_shared_sequences_reach_another_engines_global_tree(tokenizer):
    """share(): a finished sequence goes out (`take_shared`); adopted by another suffix cache,
    it is drafted from there at once (what Ray Serve replicas do through their hub)."""
    from conftest import tiny_model
    from draftwise.api import LLM
    from draftwise.sampling import SamplingParams

    target = tiny_model()
    spec = {"method": "suffix", "num_speculative_tokens": 8, "adaptive": False}
    a, b, c = (LLM.from_model(target, tokenizer, speculative_config=spec, max_batch_size=1) for _ in range(3))
    assert a.engine.proposer.share().sequences and c.engine.proposer.take_shared().sequences == []
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompt = "quite a different prompt: "
    first = a.generate(prompt, params)[0]
    sent = a.engine.proposer.take_shared()
    assert sent.sequences == [first.prompt_token_ids + first.token_ids] and not sent.examples
    assert a.engine.proposer.take_shared().sequences == []
    b.engine.proposer.adopt(sent.sequences)
    shared, alone = b.generate(prompt, params)[0], c.generate(prompt, params)[0]
    assert shared.token_ids == alone.token_ids == first.token_ids
    assert shared.stats["mean_accepted_length"] > 4 > alone.stats["mean_accepted_length"] + 1
