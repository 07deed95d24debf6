"""Speculative decoding end to end: lossless against plain decoding, for every proposer."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model, check_seeded_and_top1_greedy
from draftwise.api import LLM
from draftwise.errors import BadInput
from draftwise.sampling import SamplingParams

def noisy_copy(model, noise: float, seed: int = 1):
    """A draft that agrees with the target often but not always."""
    import copy

    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * noise)
    return draft


REPETITIVE = ["abcabcabcabcabc", "the cat sat on the mat. the cat sat on the", "x = 1\nx = 1\nx = 1\n", "zz"]


def spec_llm(model, tokenizer, method: str, draft=None, k: int = 4, adaptive: bool = False, batch: int = 4) -> LLM:
    cfg = {"method": method, "num_speculative_tokens": k, "adaptive": adaptive}
    return LLM.from_model(model, tokenizer, speculative_config=cfg, max_batch_size=batch, draft_model=draft)


def run(llm: LLM, params: SamplingParams) -> list:
    return llm.generate(REPETITIVE, params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["ngram", "suffix", "draft_model"])
def test_greedy_speculative_equals_plain(tokenizer, method, dtype):
    target = tiny_model("qwen2", dtype, seed=0)
    draft = noisy_copy(target, 0.05)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    plain = run(LLM.from_model(target, tokenizer, max_batch_size=4), params)
    spec = run(spec_llm(target, tokenizer, method, draft=draft), params)
    for p, s in zip(plain, spec):
        assert s.token_ids == p.token_ids
    accepted = sum(s.stats["accepted_tokens"] for s in spec)
    assert accepted > 0, "the test must exercise acceptance, not only rejection"
    assert sum(s.stats["target_passes"] for s in spec) < sum(p.stats["target_passes"] for p in plain)


def test_draft_identical_to_target_accepts_everything(tokenizer):
    target = tiny_model("llama", torch.float32)
    llm = spec_llm(target, tokenizer, "draft_model", draft=target, k=5)
    out = llm.generate(["hello"], SamplingParams(temperature=0.0, max_tokens=31, ignore_eos=True))[0]
    st = out.stats
    assert st["acceptance_rate"] == 1.0
    assert st["mean_accepted_length"] == pytest.approx(6.0)
    assert st["target_passes"] == 1 + 5  # prefill, then 5 passes of 6 tokens


def test_greedy_penalties_and_stops_hold_under_speculation(tokenizer):
    target = tiny_model("qwen2", torch.float32)
    params = SamplingParams(temperature=0.0, max_tokens=40, repetition_penalty=1.3, frequency_penalty=0.5, ignore_eos=True)
    plain = run(LLM.from_model(target, tokenizer, max_batch_size=4), params)
    spec = run(spec_llm(target, tokenizer, "ngram"), params)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    free = run(LLM.from_model(target, tokenizer, max_batch_size=4), SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    stop = free[0].text[10:12]
    params = SamplingParams(temperature=0.0, max_tokens=40, stop=[stop], ignore_eos=True)
    assert run(spec_llm(target, tokenizer, "ngram"), params)[0].text == free[0].text[: free[0].text.index(stop)]


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_sampled_speculation_is_seed_reproducible_and_top_k1_is_greedy(tokenizer, method):
    target = tiny_model("qwen2", torch.float32, std=0.1)
    draft = noisy_copy(target, 0.05)
    llm = spec_llm(target, tokenizer, method, draft=draft)
    check_seeded_and_top1_greedy(llm, target, tokenizer, REPETITIVE, max_tokens=30)


def test_sampled_speculation_matches_plain_distribution(tokenizer):
    """Rejection sampling end to end: the 3rd generated token has the plain distribution.
    (Classic mode: in the default coupled mode the two runs would give the same tokens,
    which tests/test_coupled.py checks.)"""
    target = tiny_model("llama", torch.float32, std=0.08)
    draft = noisy_copy(target, 0.08)
    n = 600
    params = [SamplingParams(max_tokens=3, temperature=1.0, top_k=4, seed=s, ignore_eos=True, sampling="rejection")
              for s in range(n)]
    prompts = ["ab"] * n
    plain = LLM.from_model(target, tokenizer, max_batch_size=16).generate(prompts, params)
    spec = spec_llm(target, tokenizer, "draft_model", draft=draft, k=2, batch=16).generate(prompts, params)
    def hist(outs):
        h: dict[tuple, int] = {}
        for o in outs:
            key = tuple(o.token_ids[:3])
            h[key] = h.get(key, 0) + 1
        return h
    hp, hs = hist(plain), hist(spec)
    tv = 0.5 * sum(abs(hp.get(k, 0) - hs.get(k, 0)) for k in set(hp) | set(hs)) / n
    # 64 possible sequences, 600 samples each: sampling noise alone gives TV ~ 0.15; a
    # verifier that skipped the correction (accepting every draft token) gives ~ 0.5+
    assert tv < 0.25, tv
    assert sum(o.stats["accepted_tokens"] for o in spec) > 0


def test_mismatched_draft_vocabulary_is_refused(tokenizer):
    from draftwise.speculators.draft_model import check_same_vocabulary
    from transformers import AutoTokenizer  # noqa: F401

    other = type("Tok", (), {"get_vocab": lambda self: {"a": 0}})()
    with pytest.raises(BadInput, match="different vocabulary"):
        check_same_vocabulary(tokenizer, other, "target", "other")


def test_unknown_speculator_is_a_clear_error(tokenizer):
    with pytest.raises(BadInput, match="unknown speculator 'nope'; available: .*ngram"):
        LLM.from_model(tiny_model(), tokenizer, speculative_config={"method": "nope"})
    with pytest.raises(BadInput, match="num_speculative_tokens"):
        LLM.from_model(tiny_model(), tokenizer, speculative_config='{"method": "ngram", "num_speculative_tokens": -1}')


def test_draft_model_quantization_is_its_own_setting():
    from draftwise.config import parse_speculative_config
    from draftwise.speculators.draft_model import draft_quantization

    plain = parse_speculative_config({"method": "draft_model", "model": "m"})
    assert draft_quantization(plain, "none") == "none"
    assert draft_quantization(plain, "w4a8-all") == draft_quantization(plain, "w4a8") == "w4a8-all"
    assert draft_quantization(plain, "int8") == "w8a8-all"  # also on CUDA, where w4a8 is refused
    own = parse_speculative_config({"method": "draft_model", "model": "m", "draft_quantization": "w4a8-all"})
    assert draft_quantization(own, "none") == "w4a8-all"
