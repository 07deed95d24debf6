"""Prompt lookup ("ngram") proposer: matching rules and the incremental index."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from draftwise.config import SpeculativeConfig
from draftwise.request import RequestState
from draftwise.sampling import SamplingParams
from draftwise.speculators.base import proposer_class
from draftwise.speculators.ngram import NgramProposer


def make_request(prompt: list[int], output: list[int] | None = None, rid: str = "r") -> RequestState:
    return RequestState(request_id=rid, prompt_ids=list(prompt), params=SamplingParams(temperature=0.0, max_tokens=128), output_ids=list(output or []))


def propose_one(proposer: NgramProposer, request: RequestState, k: int) -> list[int]:
    draft = proposer.propose([request], [k])
    assert draft.parents == [None] and draft.probs == [None]
    return draft.tokens[0]


def reference(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Brute force: most recent earlier occurrence of the longest suffix n-gram, periodic copy."""
    size = len(tokens)
    for n in range(max_n, min_n - 1, -1):
        if n >= size:
            continue
        suffix = tokens[size - n :]
        for p in range(size - 1, n - 1, -1):  # p: position right after the occurrence
            if tokens[p - n : p] == suffix:
                return [tokens[p + j % (size - p)] for j in range(k)]
    return []


def test_registered_and_from_config() -> None:
    cfg = SpeculativeConfig(method="ngram", prompt_lookup_min=2, prompt_lookup_max=3)
    proposer = proposer_class("ngram").from_config(cfg, None)
    assert isinstance(proposer, NgramProposer)
    assert (proposer.min_n, proposer.max_n) == (2, 3)


def test_most_recent_match() -> None:
    p = NgramProposer(2, 2)
    req = make_request([1, 2, 3, 9, 1, 2, 4, 7, 1, 2])
    p.begin(req)
    assert propose_one(p, req, 3) == [4, 7, 1]


def test_prefers_longer_ngram() -> None:
    tokens = [5, 1, 2, 3, 8, 6, 1, 2, 9, 5, 1, 2]
    long = NgramProposer(1, 3)
    req = make_request(tokens)
    long.begin(req)
    assert propose_one(long, req, 2) == [3, 8]  # (5, 1, 2) beats the more recent (1, 2)
    short = NgramProposer(1, 2)
    short.begin(req)
    assert propose_one(short, req, 2) == [9, 5]


def test_respects_budget_and_min() -> None:
    p = NgramProposer(1, 4)
    req = make_request([1, 2, 3, 4, 5, 6, 1, 2])
    p.begin(req)
    assert propose_one(p, req, 0) == []
    assert propose_one(p, req, 1) == [3]
    assert propose_one(p, req, 4) == [3, 4, 5, 6]
    # only a 1-gram matches here: with min 2 there is nothing to propose
    p2 = NgramProposer(2, 4)
    req2 = make_request([7, 1, 2, 3, 4, 8, 4])
    p2.begin(req2)
    assert propose_one(p2, req2, 3) == []
    p1 = NgramProposer(1, 4)
    p1.begin(req2)
    assert propose_one(p1, req2, 3) == [8, 4, 8]  # periodic copy after the overlapping match


def test_no_match_is_empty() -> None:
    p = NgramProposer(1, 3)
    req = make_request([1, 2, 3, 4, 5])
    p.begin(req)
    assert propose_one(p, req, 4) == []
    short = make_request([1])
    p.begin(short)
    assert propose_one(p, short, 4) == []


def test_periodic_extension() -> None:
    p = NgramProposer(2, 2)
    req = make_request([1, 2, 1, 2, 1, 2])
    p.begin(req)
    assert propose_one(p, req, 5) == [1, 2, 1, 2, 1]


def test_output_growth_and_end() -> None:
    p = NgramProposer(1, 3)
    req = make_request([10, 11, 12, 13])
    p.begin(req)
    assert propose_one(p, req, 2) == []
    req.output_ids += [14, 10, 11]
    p.on_accept(req, 2)
    assert propose_one(p, req, 3) == [12, 13, 14]
    p.end(req)
    assert not p._state


def test_batch_of_requests() -> None:
    p = NgramProposer(1, 2)
    a = make_request([1, 2, 3, 1, 2], rid="a")
    b = make_request([4, 5, 6], rid="b")
    for r in (a, b):
        p.begin(r)
    draft = p.propose([a, b], [2, 2])
    assert draft.tokens == [[3, 1], []]


@settings(max_examples=150, deadline=None)
@given(
    prompt=st.lists(st.integers(0, 2), min_size=1, max_size=30),
    chunks=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=5), max_size=8),
    bounds=st.tuples(st.integers(1, 4), st.integers(0, 3)),
    k=st.integers(0, 6),
    call_begin=st.booleans(),
)
def test_incremental_index_matches_reference(
    prompt: list[int], chunks: list[list[int]], bounds: tuple[int, int], k: int, call_begin: bool
) -> None:
    min_n, extra = bounds
    p = NgramProposer(min_n, min_n + extra)
    req = make_request(prompt)
    if call_begin:
        p.begin(req)
    assert propose_one(p, req, k) == reference(req.all_ids, k, p.min_n, p.max_n)
    for chunk in chunks:
        # a draft that is rejected never reaches output_ids; only committed tokens do
        req.output_ids.extend(chunk)
        p.on_accept(req, len(chunk) - 1)
        assert propose_one(p, req, k) == reference(req.all_ids, k, p.min_n, p.max_n)
