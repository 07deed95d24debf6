"""Seeded sampling that speculation does not change (randomness keyed by position).

With `sampling="coupled"` (the default) a seeded request samples the very same tokens
with every speculator as plain decoding does, alone or batched beside other requests;
the distribution is still the target's (checked against classic rejection sampling's).
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from draftwise.api import LLM
from draftwise.sampling import SamplingParams, coupled_pick, position_noise

PROMPTS = ["abcabcabcabcabc", "the cat sat on the mat. the cat sat on the", "x = 1\nx = 1\nx = 1\n", "zz"]
# different settings per request, all sampled, all seeded
PARAMS = [
    SamplingParams(max_tokens=28, temperature=0.7, top_k=8, seed=11, ignore_eos=True),
    SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=12, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=1.2, min_p=0.05, repetition_penalty=1.2, seed=13, ignore_eos=True),
    SamplingParams(max_tokens=16, temperature=0.9, frequency_penalty=0.3, presence_penalty=0.2, seed=14,
                   ignore_eos=True),
]
METHODS = ["ngram", "suffix", "draft_model", "layer_skip", "mtp", "medusa", "eagle"]


def speculative_llm(method: str, target, tokenizer, batch: int) -> LLM:
    cfg: dict = {"method": method, "num_speculative_tokens": 4, "adaptive": False}
    draft = None
    if method == "draft_model":
        from test_speculative import noisy_copy

        draft = noisy_copy(target, 0.01)
    elif method == "layer_skip":
        cfg["num_layers"] = 1
    elif method == "mtp":
        from test_mtp import copy_mtp

        draft = copy_mtp(target)
    elif method == "medusa":
        from test_medusa import random_heads

        draft = random_heads(target).to(target.dtype)
        cfg["num_speculative_tokens"] = 8
    elif method == "eagle":
        from test_eagle import random_head

        draft = random_head(target, "eagle3")
        cfg["num_speculative_tokens"] = 8
    return LLM.from_model(target, tokenizer, speculative_config=cfg, max_batch_size=batch, draft_model=draft)


def sharp_target(dtype):
    """A tiny model whose logits are sharpened (final norm x4), so that sampled text at
    temperature ~1 still repeats itself and drafts get accepted."""
    target = tiny_model("qwen2", dtype, seed=0, num_hidden_layers=4)
    with torch.no_grad():
        target.model.norm.weight.mul_(4.0)
    return target


def solo(target, tokenizer) -> list[list[int]]:
    """Each request decoded alone, without speculation: the reference."""
    llm = LLM.from_model(target, tokenizer, max_batch_size=1)
    return [llm.generate([p], sp)[0].token_ids for p, sp in zip(PROMPTS, PARAMS)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_seeded_sampling_gives_plain_tokens_with_speculation_at_any_batch(tokenizer, method, dtype):
    target = sharp_target(dtype)
    reference = solo(target, tokenizer)
    got = speculative_llm(method, target, tokenizer, batch=4).generate(PROMPTS, PARAMS)  # batched, mixed settings
    assert [o.token_ids for o in got] == reference
    # drafts were verified (rejected ones too: their recovered tokens come from the position
    # noise); random tiny drafters are seldom accepted when sampling, so acceptance itself
    # is exercised by the oracle tests below
    assert sum(o.stats["draft_tokens"] for o in got) > 0


def oracle_run(target, tokenizer, reference: list[list[int]], nodes: int) -> list:
    """Speculation by conftest's OracleTree (the reference continuation as one path of a
    tree with decoys, cut every 5th level): (requests, their token ids)."""
    from conftest import OracleTree
    from draftwise.engine.controller import FixedController
    from draftwise.engine.engine import Engine

    ids = [tokenizer.encode(p) for p in PROMPTS]
    proposer = OracleTree({tuple(i): r for i, r in zip(ids, reference)}, target.config.vocab_size)
    engine = Engine(target, tokenizer, proposer=proposer, controller=FixedController(nodes), max_batch_size=4,
                    max_speculative_tokens=nodes)
    reqs = [engine.add_request(i, sp) for i, sp in zip(ids, PARAMS)]
    engine.run_until_done()
    return reqs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_oracle_tree_of_the_seeded_answer_is_accepted_and_changes_nothing(tokenizer, dtype):
    """A draft holding the very tokens plain seeded sampling gave is accepted along its
    path (coupled verification picks the same token at each position), and the output is
    those tokens, batched, with decoys at scattered slots."""
    target = sharp_target(dtype)
    reference = solo(target, tokenizer)
    reqs = oracle_run(target, tokenizer, reference, nodes=8)
    assert [r.output_ids for r in reqs] == reference
    accepted = sum(r.stats.accepted_tokens for r in reqs)
    assert accepted >= 0.5 * sum(len(r) for r in reference), accepted


def test_position_noise_is_a_pure_function_of_seed_and_position():
    a = position_noise(5, 17, 1000)
    assert torch.equal(a, position_noise(5, 17, 1000))
    assert torch.equal(position_noise(5, 17, 600), a[:600])  # the vocabulary size does not move it
    assert not torch.equal(a, position_noise(5, 18, 1000)) and not torch.equal(a, position_noise(6, 17, 1000))
    probs = torch.zeros(1000)
    probs[[3, 9]] = torch.tensor([0.25, 0.75])
    picks = [coupled_pick(probs, 1, t) for t in range(4000)]
    assert set(picks) == {3, 9} and abs(picks.count(9) / 4000 - 0.75) < 0.03  # a sample of p


def test_noise_keyed_by_call_count_is_caught(tokenizer, monkeypatch):
    """A known-bad coupling: noise from a counter of calls, not the position. Speculation
    then draws another number of times than plain decoding and the tokens part."""
    import draftwise.request as request_mod
    import draftwise.sampling as sampling_mod
    import draftwise.verify as verify_mod

    calls = [0]

    def by_call(seed, position, vocab, device=None):
        calls[0] += 1
        return position_noise(seed, calls[0], vocab, device)

    monkeypatch.setattr(verify_mod, "position_noise", by_call)
    monkeypatch.setattr(sampling_mod, "position_noise", by_call)
    monkeypatch.setattr(request_mod, "position_noise", by_call)
    target = sharp_target(torch.float32)
    reference = solo(target, tokenizer)
    assert [r.output_ids for r in oracle_run(target, tokenizer, reference, nodes=8)] != reference


def test_coupled_speculation_samples_the_plain_distribution(tokenizer):
    """Coupled draft_model speculation against plain decoding by classic multinomial draws
    (independent randomness): the 3rd token's joint distribution agrees."""
    target = tiny_model("llama", torch.float32, std=0.08)
    from test_speculative import noisy_copy

    draft = noisy_copy(target, 0.08)
    n = 600
    coupled = [SamplingParams(max_tokens=3, temperature=1.0, top_k=4, seed=s, ignore_eos=True) for s in range(n)]
    classic = [p.model_copy(update={"sampling": "rejection", "seed": 10_000 + p.seed}) for p in coupled]
    prompts = ["ab"] * n
    plain = LLM.from_model(target, tokenizer, max_batch_size=16).generate(prompts, classic)
    cfg = {"method": "draft_model", "num_speculative_tokens": 2, "adaptive": False}
    spec = LLM.from_model(target, tokenizer, speculative_config=cfg, max_batch_size=16,
                          draft_model=draft).generate(prompts, coupled)

    def hist(outs):
        h: dict[tuple, int] = {}
        for o in outs:
            h[tuple(o.token_ids[:3])] = h.get(tuple(o.token_ids[:3]), 0) + 1
        return h

    hp, hs = hist(plain), hist(spec)
    tv = 0.5 * sum(abs(hp.get(k, 0) - hs.get(k, 0)) for k in set(hp) | set(hs)) / n
    assert tv < 0.25, tv  # sampling noise alone ~0.15 (64 outcomes, 600 samples each)
    assert sum(o.stats["accepted_tokens"] for o in spec) > 0


def test_n_samples_each_have_their_own_seed_stream_and_speculation_keeps_them(tokenizer):
    """SamplingParams(n=3, seed=s) in LLM.generate: three samples, sample i is what a single
    request seeded s + i gives; with speculation (coupled sampling) the very same tokens."""
    target = tiny_model()
    plain = LLM.from_model(target, tokenizer, max_batch_size=4)
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=40, n=3, ignore_eos=True)
    out = plain.generate(PROMPTS[:2], params)
    assert [len(o.outputs) for o in out] == [3, 3]
    assert [c.index for c in out[0].outputs] == [0, 1, 2]
    assert out[0].token_ids == out[0].outputs[0].token_ids and out[0].text == out[0].outputs[0].text
    for i in range(3):
        single = plain.generate(PROMPTS[0], params.model_copy(update={"n": 1, "seed": 40 + i}))[0]
        assert out[0].outputs[i].token_ids == single.token_ids
    assert len({tuple(c.token_ids) for c in out[0].outputs}) > 1  # the samples differ
    spec = LLM.from_model(target, tokenizer, max_batch_size=4,
                          speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    again = spec.generate(PROMPTS[:2], params)
    assert [[c.token_ids for c in o.outputs] for o in again] == [[c.token_ids for c in o.outputs] for o in out]
    greedy = plain.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12, n=2, ignore_eos=True))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_position_noise_is_computed_once_for_drafter_and_verifier(tokenizer, monkeypatch):
    """The draft model and the verifier share each request's noise (RequestState.noise):
    one computation per (request, position), and the same tokens as plain decoding."""
    import draftwise.request as request_module
    import draftwise.verify as verify_module

    target = sharp_target(torch.float32)
    reference = solo(target, tokenizer)
    made: list[tuple[int, int]] = []

    def counted(seed, position, vocab, device=None):
        made.append((seed, position))
        return position_noise(seed, position, vocab, device)

    def forbidden(*args, **kwargs):
        raise AssertionError("the verifier computed noise the request already holds")

    monkeypatch.setattr(request_module, "position_noise", counted)
    monkeypatch.setattr(verify_module, "position_noise", forbidden)
    got = speculative_llm("draft_model", target, tokenizer, batch=4).generate(PROMPTS, PARAMS)
    assert [g.token_ids for g in got] == reference
    assert len(made) == len(set(made)) and len(made) >= sum(len(r) for r in reference)
    assert sum(g.stats["accepted_tokens"] for g in got) > 0
