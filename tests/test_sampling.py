"""From logits to the distribution to sample from: penalties, temperature, truncation, greedy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import RepetitionPenaltyLogitsProcessor

from draftwise.sampling import SamplingParams, apply_penalties, sample, target_distribution


pytestmark = pytest.mark.usefixtures("one_thread")


def probs_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()  # [1, vocab]


def kept(probs: torch.Tensor) -> set[int]:
    return set(torch.nonzero(probs[0] > 0).flatten().tolist())


# --- plain temperature sampling and greedy ---------------------------------------------------


def test_temperature_only_is_softmax_of_scaled_logits() -> None:
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    probs = target_distribution(logits, SamplingParams(max_tokens=128, temperature=0.7), [1], [], [4, 5])
    torch.testing.assert_close(probs, torch.softmax(logits / 0.7, dim=-1))


def test_greedy_is_one_hot_at_first_maximum() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 0.0, -1.0]])
    probs = target_distribution(logits, SamplingParams(max_tokens=128, temperature=0.0), [], [], [1])
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]


def test_greedy_uses_penalized_logits() -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    params = SamplingParams(max_tokens=128, temperature=0.0, repetition_penalty=1.2)
    assert target_distribution(logits, params, [0], []).argmax().item() == 1


def test_half_precision_input_gives_fp32_and_input_is_untouched() -> None:
    logits = torch.randn(2, 9, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    before = logits.clone()
    params = SamplingParams(max_tokens=128, temperature=1.3, top_k=4, top_p=0.8, repetition_penalty=1.5, frequency_penalty=0.5)
    probs = target_distribution(logits, params, [1, 2], [3], [3])
    assert probs.dtype == torch.float32
    assert torch.equal(logits, before)
    fp32 = logits.float()
    target_distribution(fp32, params, [1, 2], [3], [3])
    assert torch.equal(fp32, before.float())


def test_shape_must_match_draft() -> None:
    with pytest.raises(ValueError):
        target_distribution(torch.zeros(2, 5), SamplingParams(temperature=0.0, max_tokens=128), [], [], [1, 2])
    with pytest.raises(ValueError):
        target_distribution(torch.zeros(3, 5), SamplingParams(temperature=0.0, max_tokens=128), [], [], [1, 2], parents=[-1])


# --- penalties ---------------------------------------------------------------------------------


def test_repetition_penalty_matches_transformers() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 50, generator=gen) * 3  # [1, vocab]
    prompt, output = [3, 7, 7, 11, 49], [0, 11, 20]
    params = SamplingParams(max_tokens=128, temperature=1.0, repetition_penalty=1.7)
    ours = apply_penalties(logits, params, prompt, output)
    ref = RepetitionPenaltyLogitsProcessor(penalty=1.7)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(target_distribution(logits, params, prompt, output), torch.softmax(ref, dim=-1))


def test_presence_and_frequency_penalties_by_hand() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    params = SamplingParams(max_tokens=128, temperature=1.0, presence_penalty=0.5, frequency_penalty=0.25)
    # prompt tokens are not penalized; output 1 x1, 3 x3
    out = apply_penalties(logits, params, prompt_ids=[0, 2, 4], output_ids=[3, 1, 3, 3])
    expected = [1.0, 2.0 - 0.5 - 0.25, 3.0, 4.0 - 0.5 - 0.75, 5.0]
    assert out[0].tolist() == pytest.approx(expected)


def test_no_penalty_returns_the_same_logits() -> None:
    logits = torch.randn(2, 4)
    assert apply_penalties(logits, SamplingParams(max_tokens=128, temperature=1.0), [0, 1], [2], [3]) is logits


def test_draft_token_penalizes_later_rows_only() -> None:
    logits = torch.zeros(3, 6)
    logits[:, 2] = 1.0
    params = SamplingParams(max_tokens=128, temperature=1.0, presence_penalty=1.0)
    out = apply_penalties(logits, params, [], [], draft_tokens=[2, 5])
    assert out[0].tolist() == [0, 0, 1, 0, 0, 0]  # the root row sees no draft token
    assert out[1].tolist() == [0, 0, 0, 0, 0, 0]  # after node 0 (token 2)
    assert out[2].tolist() == [0, 0, 0, 0, 0, -1]  # after node 1 (tokens 2, 5)


def test_tree_rows_use_their_own_path() -> None:
    # root -> node0 (tok 1) -> node2 (tok 3); root -> node1 (tok 2) -> node3 (tok 4)
    params = SamplingParams(max_tokens=128, temperature=1.0, frequency_penalty=1.0)
    out = apply_penalties(torch.zeros(5, 6), params, [], [1], draft_tokens=[1, 2, 3, 4], parents=[-1, -1, 0, 1])
    assert out[0].tolist() == [0, -1, 0, 0, 0, 0]
    assert out[1].tolist() == [0, -2, 0, 0, 0, 0]
    assert out[2].tolist() == [0, -1, -1, 0, 0, 0]
    assert out[3].tolist() == [0, -2, 0, -1, 0, 0]
    assert out[4].tolist() == [0, -1, -1, 0, -1, 0]


def path_of(node: int, parents: list[int] | None) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = node - 1 if parents is None else parents[node]
    return path[::-1]


@st.composite
def draft_trees(draw: st.DrawFn, vocab: int) -> tuple[list[int], list[int] | None]:
    n = draw(st.integers(0, 6))
    tokens = draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n))
    if draw(st.booleans()):
        return tokens, None
    return tokens, [draw(st.integers(-1, j - 1)) for j in range(n)]


@settings(max_examples=60, deadline=None)
@given(
    tree=draft_trees(vocab=8),
    prompt=st.lists(st.integers(0, 7), max_size=5),
    output=st.lists(st.integers(0, 7), max_size=5),
    rep=st.sampled_from([1.0, 0.8, 1.3]),
    presence=st.sampled_from([0.0, 0.7, -0.4]),
    frequency=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_each_row_equals_plain_decoding_with_its_path_committed(tree, prompt, output, rep, presence, frequency, seed):
    tokens, parents = tree
    logits = torch.randn(len(tokens) + 1, 8, generator=torch.Generator().manual_seed(seed))
    params = SamplingParams(max_tokens=128,
        temperature=0.9, repetition_penalty=rep, presence_penalty=presence, frequency_penalty=frequency
    )
    rows = target_distribution(logits, params, prompt, output, tokens, parents)
    for r in range(len(tokens) + 1):
        history = output + [tokens[j] for j in path_of(r - 1, parents)]
        alone = target_distribution(logits[r : r + 1], params, prompt, history)
        torch.testing.assert_close(rows[r : r + 1], alone)


# --- truncation ----------------------------------------------------------------------------


P = [0.4, 0.3, 0.2, 0.1]


@pytest.mark.parametrize(
    ("k", "expected"), [(1, {0}), (2, {0, 1}), (3, {0, 1, 2}), (4, {0, 1, 2, 3}), (0, {0, 1, 2, 3})]
)
def test_top_k(k: int, expected: set[int]) -> None:
    probs = target_distribution(probs_logits(P), SamplingParams(max_tokens=128, temperature=1.0, top_k=k), [], [])
    assert kept(probs) == expected
    assert probs.sum().item() == pytest.approx(1.0)


def test_top_k_keeps_ties() -> None:
    params = SamplingParams(max_tokens=128, temperature=1.0, top_k=2)
    probs = target_distribution(probs_logits([0.3, 0.3, 0.3, 0.1]), params, [], [])
    assert kept(probs) == {0, 1, 2}


@pytest.mark.parametrize(("p", "expected"), [(0.3, {0}), (0.65, {0, 1}), (0.75, {0, 1, 2}), (0.95, {0, 1, 2, 3})])
def test_top_p(p: float, expected: set[int]) -> None:
    probs = target_distribution(probs_logits(P), SamplingParams(max_tokens=128, temperature=1.0, top_p=p), [], [])
    assert kept(probs) == expected
    expected_probs = torch.tensor([P]) * torch.tensor([[i in expected for i in range(4)]])
    torch.testing.assert_close(probs, expected_probs / expected_probs.sum())


@pytest.mark.parametrize(("m", "expected"), [(0.9, {0}), (0.6, {0, 1}), (0.4, {0, 1, 2}), (0.1, {0, 1, 2, 3})])
def test_min_p(m: float, expected: set[int]) -> None:
    probs = target_distribution(probs_logits(P), SamplingParams(max_tokens=128, temperature=1.0, min_p=m), [], [])
    assert kept(probs) == expected


def test_truncations_chain_in_order() -> None:
    # top_p 0.75 alone keeps {0, 1, 2}; after top_k 3 renormalizes to [.44, .33, .22], only {0, 1}
    params = SamplingParams(max_tokens=128, temperature=1.0, top_k=3, top_p=0.75)
    assert kept(target_distribution(probs_logits(P), params, [], [])) == {0, 1}
    # min_p compares to the max probability, which truncation rescales with everything else
    params = SamplingParams(max_tokens=128, temperature=1.0, top_k=3, top_p=0.75, min_p=0.8)
    assert kept(target_distribution(probs_logits(P), params, [], [])) == {0}
    # min-p comes after top-p: min-p first would leave [.44, .33, .22] and top-p 0.75 then {0, 1}
    params = SamplingParams(max_tokens=128, temperature=1.0, top_p=0.75, min_p=0.3)
    assert kept(target_distribution(probs_logits(P), params, [], [])) == {0, 1, 2}


def test_truncation_acts_on_the_tempered_distribution() -> None:
    # at temperature 0.5 the probabilities are ~ [.53, .30, .13, .03]: top_p 0.8 keeps {0, 1}
    probs = target_distribution(probs_logits(P), SamplingParams(max_tokens=128, temperature=0.5, top_p=0.8), [], [])
    assert kept(probs) == {0, 1}


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    temperature=st.floats(0.1, 3.0),
    top_k=st.integers(0, 12),
    top_p=st.floats(0.05, 1.0),
    min_p=st.floats(0.0, 1.0),
)
def test_truncation_keeps_a_top_prefix(seed, temperature, top_k, top_p, min_p) -> None:
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(seed)) * 2
    params = SamplingParams(max_tokens=128, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    probs = target_distribution(logits, params, [], [], [0, 0])  # no penalty: the draft is irrelevant
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    base = torch.softmax(logits / temperature, dim=-1)
    for r in range(3):
        keep = probs[r] > 0
        assert keep[base[r].argmax()]
        if not keep.all():
            assert base[r][keep].min() >= base[r][~keep].max()
        if top_k:
            assert int(keep.sum()) <= top_k
        ratio = probs[r][keep] / base[r][keep]  # kept tokens keep their relative weights
        torch.testing.assert_close(ratio, ratio[0].expand_as(ratio), rtol=1e-4, atol=0)


# --- sampling ----------------------------------------------------------------------------------


def test_sample_one_hot_gives_its_index() -> None:
    probs = torch.zeros(3, 7)
    probs[0, 4] = probs[1, 0] = probs[2, 6] = 1.0
    assert sample(probs, torch.Generator().manual_seed(0)).tolist() == [4, 0, 6]


def test_sample_frequencies() -> None:
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    draws = sample(p.expand(40_000, 4), torch.Generator().manual_seed(3))  # [40000]
    freq = torch.bincount(draws, minlength=4) / 40_000
    assert (freq - p).abs().sum().item() / 2 < 0.01


def test_coupled_is_the_default_only_with_a_seed():
    assert SamplingParams(max_tokens=128, temperature=1.0, seed=3).coupled
    assert not SamplingParams(max_tokens=128, temperature=1.0).coupled  # no seed: classic rejection sampling, higher acceptance
    assert SamplingParams(max_tokens=128, temperature=1.0, sampling="coupled").coupled
    assert not SamplingParams(max_tokens=128, temperature=1.0, seed=3, sampling="rejection").coupled
