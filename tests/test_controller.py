"""The draft-length controller picks k from measured costs and acceptance."""

from __future__ import annotations

import pytest

from draftwise.engine.controller import AdaptiveController, CostModel, expected_tokens
from draftwise.request import RequestState
from draftwise.sampling import SamplingParams


def req(drafted: int, accepted: int) -> RequestState:
    """A request whose `drafted` draft tokens were verified one per draft (k = 1)."""
    r = RequestState("r", [1], SamplingParams(temperature=0.0, max_tokens=128))
    for i in range(drafted):
        r.stats.observe_draft(1, int(i < accepted))
    return r


def controller(cost_per_token: float, base: float = 1.0, draft: float = 0.0, k_max: int = 8) -> AdaptiveController:
    c = AdaptiveController(k_max)
    for n in (1, 2, 4, 8, 16, 32, 64, 128):
        c.costs.observe_pass(n, base + cost_per_token * n)
    c.costs.drafts.observe(1, draft)
    return c


def test_expected_tokens():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens([0.5, 0.5, 0.5], 2) == pytest.approx(1.75)
    assert expected_tokens([0.5, 1.0, 1.0], 3) == pytest.approx(2.5)  # a run: all or nothing


def test_flat_pass_cost_and_high_acceptance_drafts_the_maximum():
    assert controller(0.0).choose([req(100, 90)]) == [8]


def test_low_acceptance_and_costly_drafts_turn_speculation_off():
    assert controller(0.0, draft=0.5).choose([req(100, 5)]) == [0]


def test_large_batches_on_compute_bound_passes_draft_less():
    c = controller(0.05)
    one = c.choose([req(100, 70)])[0]
    many = c.choose([req(100, 70)] * 64)[0]
    assert one > many


def test_nothing_measured_starts_at_configured_length():
    assert AdaptiveController(5).choose([req(0, 0)]) == [5]


def test_cost_model_interpolates_and_extrapolates_along_the_last_slope():
    m = CostModel()
    m.observe_pass(2, 1.0)
    assert m.pass_cost(12) == 1.0  # one size seen: flat, so a longer draft gets tried
    m.observe_pass(6, 2.0)
    assert m.pass_cost(4) == pytest.approx(1.5)
    assert m.pass_cost(12) == pytest.approx(3.5)
    assert m.pass_cost(1) == 0.5  # below: in proportion, so that the shorter pass gets tried


def test_plain_decoding_gets_measured_on_a_large_batch():
    """Having only seen drafting passes of a batch of 16 (64 tokens), the controller must
    try k = 0 (16 tokens) rather than take it to cost as much as the 64-token pass."""
    c = AdaptiveController(3)
    batch = [req(100, 75)] * 16
    for _ in range(2):
        c.observe(16, 4, 0.375, draft_positions=3, draft_seconds=4 * 0.088)
    assert c.choose(batch) == [0] * 16
    for _ in range(2):
        c.observe(16, 1, 0.18, draft_positions=0, draft_seconds=0.0)
    assert c.choose(batch) == [0] * 16  # measured: plain pays on this batch


def test_first_pass_of_a_size_is_a_warm_up():
    m = CostModel()
    m.observe_pass(5, 9.0)  # shape set-up
    m.observe_pass(5, 1.0)
    assert m.pass_cost(5) == 1.0
    m.observe_pass(5, 2.0)  # then a running average
    assert 1.0 < m.pass_cost(5) < 2.0


def test_acceptance_per_position_does_not_depend_on_draft_length():
    """Drafts of 4: tokens after a rejection were never tested."""
    r = RequestState("r", [1], SamplingParams(temperature=0.0, max_tokens=128))
    for accepted in [0, 1, 2, 4, 0, 1, 3, 0, 1, 0] * 20:
        r.stats.observe_draft(4, accepted)
    c = AdaptiveController(4, prior_weight=0.0)
    # position 1: 6 of 10 accepted; 2: 3 of 6; 3: 2 of 3; 4: 1 of 2
    assert c.acceptance(r) == pytest.approx([0.6, 0.5, 2 / 3, 0.5])
    assert r.stats.rejected_per_position == [80, 60, 20, 20]


def test_runs_of_acceptance_draft_longer_than_iid():
    """Copying methods are right in runs: half the drafts fail at once, the rest are taken
    whole. Per position that is worth long drafts; an i.i.d. rate at the same first-token
    acceptance is not."""
    runs, iid = RequestState("a", [1], SamplingParams(temperature=0.0, max_tokens=128)), RequestState("b", [1], SamplingParams(temperature=0.0, max_tokens=128))
    for i in range(40):
        runs.stats.observe_draft(4, 4 if i % 2 else 0)
        iid.stats.observe_draft(4, [0, 1, 0, 2][i % 4])  # a_1 = 0.5, a_2 = 0.5, a_3 = 0
    c = controller(0.15, k_max=4)
    assert c.choose([runs]) == [4]
    assert c.choose([iid])[0] <= 2


def test_tree_methods_get_the_tree_controller_unless_fixed():
    from draftwise.config import parse_speculative_config
    from draftwise.engine.controller import FixedController, make_controller
    from draftwise.engine.tree_controller import TreeController

    assert isinstance(make_controller(parse_speculative_config({"method": "ngram"})), AdaptiveController)
    eagle = make_controller(parse_speculative_config({"method": "eagle", "model": "x", "num_speculative_tokens": 12,
                                                      "eagle_tree_depth": 4}))
    assert isinstance(eagle, TreeController) and eagle.candidates[-1] == 12 and eagle.depth == 4
    fixed = parse_speculative_config({"method": "medusa", "adaptive": False})
    assert isinstance(make_controller(fixed), FixedController)


def test_every_controller_is_an_engine_controller():
    from draftwise.engine.controller import Controller, FixedController
    from draftwise.engine.tree_controller import TreeController

    for c in (AdaptiveController(4), FixedController(4), TreeController(8, 3)):
        assert isinstance(c, Controller)
        c.observe(1, 5, 0.01, draft_positions=4, draft_seconds=0.001)
        assert len(c.choose([req(0, 0)])) == 1


def test_the_controller_follows_the_proposer_class_not_the_method_name(monkeypatch):
    """A method registered under any name gets the controller its class asks for."""
    from draftwise.config import SpeculativeConfig
    from draftwise.engine.controller import make_controller
    from draftwise.engine.tree_controller import TreeController
    from draftwise.speculators import base

    class Shallow(base.Proposer):
        name = "ngram"  # a name the registry knows; the class is what counts
        drafts_trees = True

        @classmethod
        def max_tree_depth(cls, config):
            return config.num_speculative_tokens // 4

        def propose(self, requests, num_tokens):
            return base.Draft.empty(len(requests))

    monkeypatch.setitem(base._REGISTRY, "ngram", Shallow)
    c = make_controller(SpeculativeConfig(method="ngram", num_speculative_tokens=12))
    assert isinstance(c, TreeController) and c.budget == 12 and c.depth == 3


def tree_controller(accepted_at: dict[int, int], pass_per_token: float = 0.0, draft: float = 0.0, budget: int = 16):
    """A TreeController that measured a flat (or rising) pass cost, a draft cost, and at each
    budget n an accepted path of accepted_at[n] tokens, 50 steps each."""
    from draftwise.engine.tree_controller import TreeController

    c = TreeController(budget, depth=6)
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        c.costs.observe_pass(n, 1.0 + pass_per_token * n)
    for n in c.candidates:
        c.draft[n].observe(1, draft * c.tree_depth(n))
    for n, a in accepted_at.items():
        for _ in range(50):
            c.record(n, a)
    return c


def test_tree_controller_turns_speculation_off_when_nothing_is_accepted():
    c = tree_controller({16: 0, 4: 0}, pass_per_token=0.01, draft=0.02)
    r = RequestState("r", [1], SamplingParams(temperature=0.0, max_tokens=128))
    assert c.expected_tokens(16) == 1.0 and c.expected_tokens(8) == 1.0
    assert c.choose([r]) == [0]


def test_tree_controller_reads_acceptance_per_depth_and_picks_the_best_rate():
    c = tree_controller({16: 3, 4: 1}, pass_per_token=0.0, draft=0.01)
    assert c.acceptance(16) == pytest.approx([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    assert c.expected_tokens(16) == pytest.approx(4.0)
    assert c.expected_tokens(12) == pytest.approx(4.0)  # unmeasured: borrows 16's per-depth acceptance
    assert c.expected_tokens(2) == pytest.approx(2.0)  # borrowed from 4, cut at depth 2 (depth 1: 2 tokens)
    assert c.choose([RequestState("r", [1], SamplingParams(temperature=0.0, max_tokens=128))])[0] >= 12
    costly = tree_controller({16: 3, 4: 1}, pass_per_token=0.2, draft=0.01)  # big passes cost: fewer nodes
    assert costly.choose([RequestState("r", [1], SamplingParams(temperature=0.0, max_tokens=128))])[0] < 12


def test_tree_controller_learns_from_request_stats():
    from draftwise.engine.tree_controller import TreeController

    c = TreeController(8, depth=4)
    r = RequestState("r", [1], SamplingParams(temperature=0.0, max_tokens=128))
    assert c.choose([r]) == [8]  # nothing measured yet: the configured budget
    budget = 8
    for _ in range(5):
        r.stats.observe_draft(budget, 2)  # whatever the budget, a path of 2 was accepted
        c.observe(1, budget + 1, 0.1, budget, 0.01)
        budget = c.choose([r])[0]
    assert sum(c.steps_seen.values()) > 3.9  # every step that drafted was read (a k = 0 step is not)
    assert c.expected_tokens(8) == pytest.approx(3.0)


def test_tree_controller_reads_exactly_the_acceptance_a_scripted_target_gives(tokenizer):
    """Through the engine, against a scripted target whose every draft is right for exactly
    3 tokens: whatever budgets the controller tries (it follows measured wall time), each
    one it measured reads acceptance 1 down to depth 3 and 0 below, so 4 tokens a step."""
    from conftest import FixedAcceptance, ScriptedTarget
    from draftwise.engine.engine import Engine
    from draftwise.engine.tree_controller import TreeController

    c = TreeController(8)
    engine = Engine(ScriptedTarget(), tokenizer, proposer=FixedAcceptance([3], tree=True), controller=c,
                    max_batch_size=2, max_speculative_tokens=8)
    for prompt in (b"abc", b"xyz"):
        engine.add_request(list(prompt), SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
    for _ in range(40):  # far from max_tokens: no draft is cut to the room left
        engine.step()
    assert engine.running and sum(c.steps_seen.values()) > 0
    for n, seen in c.steps_seen.items():
        depth = c.tree_depth(n)
        assert c.acceptance(n) == [1.0] * min(3, depth) + [0.0] * max(0, depth - 3), n
        assert c.expected_tokens(n) == 1 + min(3, depth)


def test_draft_cost_counts_the_catch_up_pass():
    c = AdaptiveController(8)
    c.observe(1, 3, 1.0, draft_positions=2, draft_seconds=0.3)  # catch-up + 2 positions
    assert c.costs.drafts.at(1) == pytest.approx(0.1)
    c.observe(1, 1, 1.0, draft_positions=0, draft_seconds=0.0)
    assert c.rate([0.5], 0) == pytest.approx(1.0)  # no draft, no drafting cost


def test_draft_cost_is_measured_per_batch_size():
    c = AdaptiveController(4)
    for _ in range(3):
        c.observe(1, 2, 1.0, draft_positions=1, draft_seconds=0.2)
        c.observe(8, 2, 1.0, draft_positions=1, draft_seconds=1.0)
    assert c.costs.draft_cost(1, 1) == pytest.approx(0.2) and c.costs.draft_cost(8, 1) == pytest.approx(1.0)
    assert c.costs.draft_cost(4, 3) == pytest.approx((0.1 + 3 / 7 * 0.4) * 4)


def test_no_exploring_on_a_batch_where_no_draft_could_pay():
    """Speculation off: exploring k = 1 happens now and then for a small batch, where a well
    accepted draft would pay, and never for a batch whose doubled pass costs too much."""
    small, large = [req(100, 5)], [req(100, 5)] * 16
    c = AdaptiveController(4, explore_every=2)
    for n in (1, 2, 4, 5):
        c.costs.observe_pass(n, 1.0)
    c.costs.observe_pass(16, 1.0)
    c.costs.observe_pass(32, 2.0)
    c.costs.drafts.observe(1, 0.1)
    picks_small = [c.choose(small)[0] for _ in range(4)]
    picks_large = [c.choose(large)[0] for _ in range(4)]
    assert 0 in picks_small and 1 in picks_small
    assert picks_large == [0, 0, 0, 0]


def test_explorations_back_off_while_speculation_stays_off():
    c = AdaptiveController(4, explore_every=2)
    for n in (1, 2, 4, 5):
        c.costs.observe_pass(n, 1.0)
    c.costs.drafts.observe(1, 0.1)
    poor = [req(100, 5)]
    explored = [step for step in range(1, 41) if c.choose(poor)[0] > 0]
    assert explored == [2, 4, 8, 16, 32]
