"""A lookup draft grafted onto an EAGLE head's tree: the merge, the measured rate, exactness."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_model
from draftwise.api import LLM
from draftwise.request import RequestState
from draftwise.sampling import SamplingParams
from draftwise.speculators.base import Draft, Proposer
from draftwise.speculators.eagle.graft import LookupGraft, graft
from draftwise.tree import matched_length, matched_path
from test_eagle import eagle_llm, random_head


class Tree:
    def __init__(self, tokens, parents, scores):
        self.tokens, self.parents, self.scores = list(tokens), list(parents), list(scores)

    def add(self, token, parent, score):
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append(score)
        return len(self.tokens) - 1


def test_graft_merges_shared_nodes_and_keeps_children_below_parents():
    # head tree: 5 -> {6, 7}, 6 -> 8
    tree = Tree([5, 6, 7, 8], [-1, 0, 0, 1], [-0.5, -1.0, -2.0, -3.0])
    graft(tree, [5, 6, 9, 4], None, math.log(0.9))  # chain 5 6 9 4: shares 5 and 6
    assert tree.tokens == [5, 6, 7, 8, 9, 4]
    assert tree.parents == [-1, 0, 0, 1, 1, 4]
    lr = math.log(0.9)
    assert tree.scores[0] == pytest.approx(max(-0.5, lr)) and tree.scores[1] == pytest.approx(2 * lr)
    assert tree.scores[4:] == pytest.approx([3 * lr, 4 * lr])
    for j, p in enumerate(tree.parents):
        assert p < j and (p < 0 or tree.scores[p] >= tree.scores[j])
    # a grafted tree: its own branching is kept, and a root child of a different token is new
    tree = Tree([5], [-1], [-0.1])
    graft(tree, [5, 1, 2, 3], [-1, 0, 0, -1], math.log(0.5))
    assert tree.tokens == [5, 1, 2, 3] and tree.parents == [-1, 0, 0, -1]
    assert tree.scores[0] == pytest.approx(-0.1)  # the head's own score was higher


def test_matched_path_of_chains_and_trees():
    assert matched_path([5, 6, 7], None, [5, 6, 9]) == [0, 1]
    assert matched_path([5, 6, 8, 9], [-1, 0, 0, 2], [5, 8, 9, 3]) == [0, 2, 3]
    assert matched_length([5, 6, 8, 9], [-1, 0, 0, 2], [7]) == 0


class Scripted(Proposer):
    """A lookup stand-in that proposes a fixed chain."""

    name = "scripted"

    def __init__(self, chain):
        self.chain = chain
        self.calls = []

    def begin(self, request):
        self.calls.append("begin")

    def propose(self, requests, num_tokens):
        return Draft([list(self.chain[:k]) for k in num_tokens], [None] * len(requests), [None] * len(requests))

    def on_accept(self, request, num_accepted):
        self.calls.append("accept")

    def end(self, request):
        self.calls.append("end")


def test_rate_counts_right_and_wrong_guesses_against_committed_tokens():
    lookup = Scripted([1, 2, 3, 4])
    g = LookupGraft(lookup)
    req = RequestState(request_id="a", prompt_ids=[9, 9], params=SamplingParams(max_tokens=20))
    other = RequestState(request_id="b", prompt_ids=[9, 9], params=SamplingParams(max_tokens=20))
    g.begin(req)
    g.begin(other)
    start = g.log_rate(req)
    g.propose([req], [4])
    req.output_ids += [1, 2, 7]  # two right, then a wrong guess at the third position
    g.on_accept(req, 2)
    assert (g.hits, g.tries) == (2, 3)
    g.propose([req], [2])
    req.output_ids += [1, 2]  # right as far as the target went (its bonus token matched too)
    g.on_accept(req, 1)
    assert (g.hits, g.tries) == (4, 5)
    assert g.log_rate(req) > start  # this request's guesses were mostly right
    g.propose([other], [4])
    other.output_ids += [8]
    g.on_accept(other, 0)
    assert (g.hits, g.tries) == (4, 6) and g.log_rate(other) < g.log_rate(req)
    assert g.log_rate(req) <= math.log(0.95)
    g.end(req)
    assert lookup.calls.count("end") == 1 and "a" not in g._rates
    assert g.report() == {"lookup_guessed": 6.0, "lookup_right": 4.0}


PROMPTS = ["abcabcabcabcabc", "the cat sat on the mat. the cat sat on the", "x = 1\nx = 1\nx = 1\n", "zz"]


@pytest.mark.parametrize("lookup,dtype", [("ngram", torch.float32), ("suffix", torch.bfloat16)])
def test_greedy_eagle_with_lookup_equals_plain_and_accepts_more(tokenizer, lookup, dtype):
    target = tiny_model("qwen2", dtype, seed=0, num_hidden_layers=4)
    head = random_head(target)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    plain = LLM.from_model(target, tokenizer, max_batch_size=4).generate(PROMPTS, params)
    alone = eagle_llm(target, tokenizer, head).generate(PROMPTS, params)
    llm = eagle_llm(target, tokenizer, head, lookup=lookup)
    both = llm.generate(PROMPTS, params)
    assert [s.token_ids for s in both] == [p.token_ids for p in plain]
    accepted = lambda outs: sum(o.stats["accepted_tokens"] for o in outs)  # noqa: E731
    assert accepted(both) > accepted(alone)  # the lookup's guesses were checked in the same passes
    report = llm.engine.proposer.report()
    assert report["lookup_guessed"] > 0 and report["lookup_right"] > 0

