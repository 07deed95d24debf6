"""`layer_skip`: the target's first L layers draft; lossless whatever L, all accepted at L = N."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model, check_seeded_and_top1_greedy
from draftwise.api import LLM
from draftwise.errors import BadInput
from draftwise.sampling import SamplingParams
from draftwise.speculators.layer_skip import candidate_layers, pick_num_layers

PROMPTS = ["abcabcabcabcabc", "the cat sat on the mat. the cat sat on the", "x = 1\nx = 1\nx = 1\n", "zz"]


def skip_llm(model, tokenizer, num_layers, k=4, shared=False, batch=4) -> LLM:
    cfg = {"method": "layer_skip", "num_speculative_tokens": k, "adaptive": False, "num_layers": num_layers}
    llm = LLM.from_model(model, tokenizer, speculative_config=cfg, max_batch_size=batch)
    if shared:
        llm.engine.proposer.attach_target_cache(llm.engine.cache)
    return llm


@pytest.mark.parametrize("dtype,shared", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)])
def test_greedy_layer_skip_equals_plain(tokenizer, dtype, shared):
    target = tiny_model("qwen2", dtype, num_hidden_layers=3)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    plain = LLM.from_model(target, tokenizer, max_batch_size=4).generate(PROMPTS, params)
    spec = skip_llm(target, tokenizer, 2, shared=shared).generate(PROMPTS, params)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    assert sum(s.stats["accepted_tokens"] for s in spec) > 0


@pytest.mark.parametrize("shared", [False, True])
def test_all_layers_accepts_everything(tokenizer, shared):
    target = tiny_model("llama", torch.float32)
    llm = skip_llm(target, tokenizer, len(target.model.layers), k=5, shared=shared, batch=2)
    outs = llm.generate(["hello", "abcabc"], SamplingParams(temperature=0.0, max_tokens=31, ignore_eos=True))
    for out in outs:
        assert out.stats["acceptance_rate"] == 1.0
        assert out.stats["mean_accepted_length"] == pytest.approx(6.0)


def test_calibration_picks_a_measured_layer_count(tokenizer):
    target = tiny_model("llama", torch.float32, num_hidden_layers=4)
    llm = LLM.from_model(target, tokenizer, speculative_config={"method": "layer_skip", "adaptive": False})
    prop = llm.engine.proposer
    assert sorted(prop.calibration) == candidate_layers(4) == [1, 2, 3]
    assert prop.num_layers in prop.calibration
    for alpha, cost, speedup in prop.calibration.values():
        assert 0.0 <= alpha <= 1.0 and 0.0 < cost < 1.0 and speedup > 0
    out = llm.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    plain = LLM.from_model(target, tokenizer).generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in out] == [p.token_ids for p in plain]


def test_pick_num_layers_trades_acceptance_for_cost():
    costs = {4: 0.25, 8: 0.5, 12: 0.75}
    assert pick_num_layers({4: 0.9, 8: 0.95, 12: 0.99}, costs, k=4) == 4  # cheap and good enough
    assert pick_num_layers({4: 0.05, 8: 0.9, 12: 0.92}, costs, k=4) == 8  # too shallow to be right
    assert candidate_layers(32) == [4, 8, 12, 16, 20, 24]


def test_too_many_layers_is_refused(tokenizer):
    with pytest.raises(BadInput, match="num_layers must be in"):
        LLM.from_model(tiny_model(), tokenizer, speculative_config={"method": "layer_skip", "num_layers": 3})


def test_sampled_layer_skip_is_seed_reproducible_and_top_k1_is_greedy(tokenizer):
    target = tiny_model("qwen2", torch.float32, std=0.1, num_hidden_layers=3)
    llm = skip_llm(target, tokenizer, 2)
    check_seeded_and_top1_greedy(llm, target, tokenizer, PROMPTS, max_tokens=16)


def test_long_new_prompt_beside_a_long_context_stays_in_the_cache(tokenizer):
    """A padded catch-up pass would write past the draft cache: rows then run one by one."""
    from draftwise.request import RequestState
    from draftwise.speculators.layer_skip import LayerSkipProposer

    target = tiny_model("llama", torch.float32)

    def request(rid, prompt, row):
        req = RequestState(rid, prompt, SamplingParams(temperature=0.0, max_tokens=8), row=row)
        req.output_ids = [7]
        return req

    prop = LayerSkipProposer(target, 1, max_batch_size=2, max_model_len=170, k_max=2)
    a, b = request("a", [5, 6, 7] * 50, 0), request("b", list(range(3, 153)), 1)
    prop.begin(a)
    prop.propose([a], [2])
    prop.on_accept(a, 0)
    a.output_ids.append(9)
    prop.begin(b)
    assert prop.book.seen["a"] + len(b.all_ids) > prop.cache.capacity
    both = prop.propose([a, b], [2, 2])
    alone = LayerSkipProposer(target, 1, max_batch_size=2, max_model_len=170, k_max=2)
    alone.begin(b)
    assert both.tokens[1] == alone.propose([b], [2]).tokens[0]
