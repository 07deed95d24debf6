"""Verification: greedy walks, and the losslessness of speculative and recursive rejection sampling.

Statistical tests use fixed seeds and compare empirical frequencies with the exact target
distribution by total-variation distance (TV). From N draws, an exact sampler shows a TV of
about sum_k sqrt(p_k (1 - p_k) / (2 pi N)): here about 0.008 for one token (N = 12k) and
0.02 for two (N = 10k, 36 outcomes), with a standard deviation near 0.003; the bounds, 0.02
and 0.035, sit about five standard deviations above. The drafts differ from the target by
far more than the bounds (checked), so a verifier that leaned towards the draft, or dropped
a step of the algorithm, fails.
"""

from __future__ import annotations

import functools
from typing import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from draftwise.sampling import SamplingParams, target_distribution
from draftwise.verify import Verified, chain_parents, residual, verify

V = 6  # vocabulary of the statistical tests


pytestmark = pytest.mark.usefixtures("one_thread")


def one_hot_rows(best: list[int], vocab: int = 8) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(best), vocab).float()  # [rows, vocab]


def random_dists(gen: torch.Generator, *shape: int, scale: float = 1.5) -> torch.Tensor:
    return torch.softmax(torch.randn(*shape, generator=gen) * scale, dim=-1)


def tv(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return (counts.double() / counts.sum() - probs.double()).abs().sum().item() / 2


# --- greedy ------------------------------------------------------------------------------------


def test_greedy_chain_all_accepted_gets_bonus() -> None:
    got = verify([3, 1, 4], None, None, one_hot_rows([3, 1, 4, 5]), None, greedy=True)
    assert got == Verified(tokens=[3, 1, 4, 5], num_accepted=3, path=[0, 1, 2])


def test_greedy_chain_first_token_rejected() -> None:
    got = verify([2, 1, 4], None, None, one_hot_rows([3, 1, 4, 5]), None, greedy=True)
    assert got == Verified(tokens=[3], num_accepted=0, path=[])


def test_greedy_chain_stops_at_first_mismatch() -> None:
    got = verify([3, 1, 4], None, None, one_hot_rows([3, 1, 7, 5]), None, greedy=True)
    assert got == Verified(tokens=[3, 1, 7], num_accepted=2, path=[0, 1])


def test_greedy_empty_draft() -> None:
    assert verify([], None, None, one_hot_rows([6]), None, greedy=True) == Verified([6], 0, [])


def test_greedy_tree_follows_the_matching_child() -> None:
    # root -> node0 (5), node1 (2); node1 -> node2 (7), node3 (0); node3 -> node4 (1)
    tokens, parents = [5, 2, 7, 0, 1], [-1, -1, 1, 1, 3]
    best = [2, 1, 0, 3, 1, 6]  # rows: root, after node0..node4
    got = verify(tokens, parents, None, one_hot_rows(best), None, greedy=True)
    assert got == Verified(tokens=[2, 0, 1, 6], num_accepted=3, path=[1, 3, 4])


def test_greedy_tree_no_child_matches() -> None:
    got = verify([5, 2], [-1, -1], None, one_hot_rows([4, 0, 0]), None, greedy=True)
    assert got == Verified(tokens=[4], num_accepted=0, path=[])


def test_greedy_ignores_draft_probs_and_randomness() -> None:
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    q = torch.full((2, 8), 1 / 8)
    got = verify([3, 1], None, q, one_hot_rows([3, 2, 0]), gen, greedy=True)
    assert got == Verified([3, 2], 1, [0])
    assert torch.equal(gen.get_state(), state)


def test_sampling_against_one_hot_target_equals_greedy() -> None:
    target = one_hot_rows([3, 1, 7, 5])
    q = random_dists(torch.Generator().manual_seed(1), 3, 8)
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        assert verify([3, 1, 4], None, q, target, gen, greedy=False).tokens == [3, 1, 7]
        assert verify([3, 1, 4], None, None, target, gen, greedy=False).tokens == [3, 1, 7]
        assert verify([3, 6, 1], [-1, -1, 0], None, target, gen, greedy=False).tokens == [3, 1, 5]


@st.composite
def greedy_cases(draw: st.DrawFn) -> tuple[list[int], list[int], list[int]]:
    """A tree with distinct sibling tokens and per-row argmaxes that often match a child."""
    n = draw(st.integers(0, 7))
    parents: list[int] = []
    tokens: list[int] = []
    for j in range(n):
        p = draw(st.integers(-1, j - 1))
        used = {tokens[i] for i in range(j) if parents[i] == p}
        tokens.append(draw(st.sampled_from([t for t in range(8) if t not in used])))
        parents.append(p)
    best = []
    for row in range(n + 1):
        child_tokens = [tokens[j] for j in range(n) if parents[j] == row - 1]
        best.append(draw(st.sampled_from(child_tokens + [draw(st.integers(0, 7))])))
    return tokens, parents, best


@settings(max_examples=150, deadline=None)
@given(greedy_cases())
def test_greedy_tree_equals_greedy_chain_along_its_best_path(case) -> None:
    tokens, parents, best = case
    target = one_hot_rows(best)
    got = verify(tokens, parents, None, target, None, greedy=True)
    leaves = [j for j in range(len(tokens)) if j not in parents] or [-1]
    chains = []
    for leaf in leaves:
        path = []
        while leaf >= 0:
            path.insert(0, leaf)
            leaf = parents[leaf]
        rows = target[[0] + [j + 1 for j in path]]  # [len(path)+1, vocab]
        chain = verify([tokens[j] for j in path], None, None, rows, None, greedy=True)
        chains.append(Verified(chain.tokens, chain.num_accepted, [path[i] for i in chain.path]))
    assert got == max(chains, key=lambda c: c.num_accepted)


# --- sampling: deterministic edge cases --------------------------------------------------------


def test_residual_normalizes_and_falls_back_to_p() -> None:
    p = torch.tensor([0.5, 0.3, 0.2])
    torch.testing.assert_close(residual(p, torch.tensor([0.2, 0.6, 0.2])), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(residual(p, p.clone()), p)


def test_zero_target_probability_is_never_accepted_and_zero_q_is_always() -> None:
    target = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    for seed in range(50):
        gen = torch.Generator().manual_seed(seed)
        got = verify([0], None, q, target, gen, greedy=False)  # p(0) = 0
        assert got.num_accepted == 0 and got.tokens[0] in (1, 2)
        got = verify([1], None, q, target, gen, greedy=False)  # q(1) = 0 < p(1)
        assert got.num_accepted == 1
        got = verify([0], None, None, target, gen, greedy=False)
        assert got.num_accepted == 0 and got.tokens[0] in (1, 2)


def test_same_seed_same_result() -> None:
    gen = torch.Generator().manual_seed(5)
    target, q = random_dists(gen, 4, V), random_dists(gen, 3, V)
    runs = [verify([1, 2, 3], None, q, target, torch.Generator().manual_seed(9), False) for _ in range(2)]
    assert runs[0] == runs[1]


def test_shape_errors() -> None:
    with pytest.raises(ValueError):
        verify([1, 2], None, None, torch.ones(2, 4) / 4, None, greedy=False)
    with pytest.raises(ValueError):
        verify([1, 2], [-1], None, torch.ones(3, 4) / 4, None, greedy=False)
    with pytest.raises(ValueError):
        verify([1, 2], None, torch.ones(1, 4), torch.ones(3, 4) / 4, None, greedy=False)


@st.composite
def sampling_cases(draw: st.DrawFn):
    n = draw(st.integers(0, 6))
    kind = draw(st.sampled_from(["chain_q", "chain_point", "tree"]))
    parents = [draw(st.integers(-1, j - 1)) for j in range(n)] if kind == "tree" else None
    tokens = draw(st.lists(st.integers(0, V - 1), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**16))
    return tokens, parents, kind, seed


@settings(max_examples=150, deadline=None)
@given(sampling_cases())
def test_committed_tokens_are_possible_under_the_target_and_follow_a_path(case) -> None:
    tokens, parents, kind, seed = case
    gen = torch.Generator().manual_seed(seed)
    n = len(tokens)
    target = random_dists(gen, n + 1, V) * (torch.rand(n + 1, V, generator=gen) < 0.5)  # sparse rows
    target[:, 0] += 1e-3  # never an empty row
    target = target / target.sum(-1, keepdim=True)
    q = None
    if kind == "chain_q":
        q = random_dists(gen, n, V) * (torch.rand(n, V, generator=gen) < 0.5)
    got = verify(tokens, parents, q, target, gen, greedy=False)
    links = parents if parents is not None else chain_parents(n)
    assert len(got.tokens) == got.num_accepted + 1 == len(got.path) + 1
    node = -1
    for i, tok in enumerate(got.tokens):
        assert target[node + 1, tok] > 0
        if i < got.num_accepted:
            assert links[got.path[i]] == node and tokens[got.path[i]] == tok
            node = got.path[i]


# --- sampling: losslessness --------------------------------------------------------------------


def test_chain_first_token_with_q_draft() -> None:
    gen = torch.Generator().manual_seed(10)
    target, q = random_dists(gen, 4, V), random_dists(gen, 3, V)
    assert tv(q[0], target[0]) > 0.2
    n = 12_000
    drafts = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=gen) for j in range(3)], 1).tolist()
    counts = torch.zeros(V)
    for draft in drafts:
        counts[verify(draft, None, q, target, gen, greedy=False).tokens[0]] += 1
    assert tv(counts, target[0]) < 0.02


@pytest.mark.parametrize("parents", [None, [-1, -1, -1, 0, 0]], ids=["chain", "tree"])
def test_first_token_with_point_mass_candidates(parents) -> None:
    gen = torch.Generator().manual_seed(11)
    target = random_dists(gen, 6, V)
    tokens = target[0].argsort(descending=True)[:3].tolist() + [0, 1]  # the likely tokens are candidates
    if parents is None:
        tokens = tokens[:1] + [2, 3, 4, 5]
    n = 12_000
    counts = torch.zeros(V)
    for _ in range(n):
        counts[verify(tokens, parents, None, target, gen, greedy=False).tokens[0]] += 1
    assert tv(counts, target[0]) < 0.02


class ToyModel:
    """Distributions over V tokens that depend on the last two tokens of the context."""

    def __init__(self, seed: int, scale: float) -> None:
        self.table = random_dists(torch.Generator().manual_seed(seed), V + 1, V + 1, V, scale=scale)  # [V+1, V+1, V]

    def __call__(self, context: list[int]) -> torch.Tensor:
        a, b = ([V, V] + context)[-2:]
        return self.table[a, b]  # [V]


def first_two_tokens(step: Callable[[list[int]], list[int]], n: int) -> torch.Tensor:
    """Joint counts [V, V] of the first two committed tokens, stepping until there are two."""
    counts = torch.zeros(V, V)
    for _ in range(n):
        out: list[int] = []
        while len(out) < 2:
            out += step(out)
        counts[out[0], out[1]] += 1
    return counts


def exact_first_two(target: ToyModel) -> torch.Tensor:
    first = target([])  # [V]
    return first[:, None] * torch.stack([target([a]) for a in range(V)])  # [V, V]


def test_first_two_tokens_chain_with_q_draft() -> None:
    target, draft, gen = ToyModel(20, 1.5), ToyModel(21, 1.5), torch.Generator().manual_seed(22)
    assert tv(draft([]), target([])) > 0.2

    def step(out: list[int]) -> list[int]:
        tokens, q = [], []
        for _ in range(3):
            q.append(draft(out + tokens))
            tokens.append(int(torch.multinomial(q[-1], 1, generator=gen)))
        rows = torch.stack([target(out + tokens[:j]) for j in range(4)])  # [4, V]
        return verify(tokens, None, torch.stack(q), rows, gen, greedy=False).tokens

    assert tv(first_two_tokens(step, 10_000), exact_first_two(target)) < 0.035


def test_first_two_tokens_tree_of_sampled_candidates() -> None:
    target, draft, gen = ToyModel(30, 1.5), ToyModel(31, 1.5), torch.Generator().manual_seed(32)
    assert tv(draft([]), target([])) > 0.2
    parents = [-1, -1, -1, 0, 0, 1]  # three root children, two below the first, one below the second

    def step(out: list[int]) -> list[int]:
        tokens = torch.multinomial(draft(out), 3, generator=gen).tolist()  # distinct siblings
        tokens += torch.multinomial(draft(out + tokens[:1]), 2, generator=gen).tolist()
        tokens += torch.multinomial(draft(out + tokens[1:2]), 1, generator=gen).tolist()
        paths = [[], [0], [1], [2], [0, 3], [0, 4], [1, 5]]  # root, then each node's path
        rows = torch.stack([target(out + [tokens[j] for j in path]) for path in paths])  # [7, V]
        return verify(tokens, parents, None, rows, gen, greedy=False).tokens

    assert tv(first_two_tokens(step, 10_000), exact_first_two(target)) < 0.035


def test_first_two_tokens_with_sampling_options_and_penalties() -> None:
    """Speculation with target_distribution's rows matches plain decoding with it, token by token."""
    gen = torch.Generator().manual_seed(40)
    logit_table = torch.randn(V + 1, V + 1, V, generator=gen) * 2  # [V+1, V+1, V]
    prompt = [1, 1, 4]
    params = SamplingParams(max_tokens=128,
        temperature=0.8, top_k=5, top_p=0.9, min_p=0.1,
        repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3,
    )
    draft = ToyModel(41, 1.0)

    def logits(context: list[int]) -> torch.Tensor:
        a, b = ([V, V] + context)[-2:]
        return logit_table[a, b]  # [V]

    @functools.cache
    def target_rows(out: tuple[int, ...], tokens: tuple[int, ...]) -> torch.Tensor:
        rows = torch.stack([logits([*out, *tokens[:j]]) for j in range(3)])  # [3, V]
        return target_distribution(rows, params, prompt, out, tokens)  # [3, V]

    def step(out: list[int]) -> list[int]:
        tokens, q = [], []
        for _ in range(2):
            q.append(draft(out + tokens))
            tokens.append(int(torch.multinomial(q[-1], 1, generator=gen)))
        return verify(tokens, None, torch.stack(q), target_rows(tuple(out), tuple(tokens)), gen, greedy=False).tokens

    first = target_distribution(logits([])[None], params, prompt, [])[0]  # [V]
    second = torch.stack([target_distribution(logits([a])[None], params, prompt, [a])[0] for a in range(V)])
    exact = first[:, None] * second  # [V, V]
    assert (exact == 0).any()  # the truncations are active
    counts = first_two_tokens(step, 10_000)
    assert counts[exact == 0].sum() == 0
    assert tv(counts, exact) < 0.035


def test_top_k_one_makes_every_committed_token_the_argmax() -> None:
    gen = torch.Generator().manual_seed(50)
    params = SamplingParams(max_tokens=128, temperature=1.0, top_k=1)
    for _ in range(200):
        logits = torch.randn(4, V, generator=gen)
        tokens = torch.randint(0, V, (3,), generator=gen).tolist()
        probs = target_distribution(logits, params, [], [], tokens)
        q = random_dists(gen, 3, V)
        for draft_probs in (q, None):
            got = verify(tokens, None, draft_probs, probs, gen, greedy=False)
            rows = [0] + [j + 1 for j in got.path]
            assert got.tokens == logits[rows].argmax(-1).tolist()
