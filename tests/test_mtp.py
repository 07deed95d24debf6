"""`mtp`: DeepSeek-V3-style MTP modules (tiny, random, built here) draft losslessly and in step."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model, check_seeded_and_top1_greedy
from draftwise.api import LLM
from draftwise.cache import KVCache
from draftwise.errors import BadInput
from draftwise.models.transformer import padded_linear
from draftwise.sampling import SamplingParams
from draftwise.models.partial import partial_inputs
from draftwise.speculators.mtp import MTPModules, load_mtp, save_mtp

PROMPTS = ["abcabcabcabcabc", "the cat sat on the mat. the cat sat on the", "x = 1\nx = 1\nx = 1\n", "zz"]


def random_mtp(model, num_modules=3, seed=0, std=0.2, **overrides) -> MTPModules:
    torch.manual_seed(seed)
    mods = MTPModules.for_target(model.config, num_modules, **overrides)
    with torch.no_grad():
        for name, p in mods.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, std)
    return mods


def copy_mtp(model, num_modules=2) -> MTPModules:
    """Modules that pass the token embedding straight through (eh_proj = [I, 0], blocks
    off): with tied embeddings they guess 'the same token again', which a repetitive
    target often does, so drafts get accepted."""
    h = model.config.hidden_size
    mods = MTPModules.for_target(model.config, num_modules)
    with torch.no_grad():
        for name, p in mods.named_parameters():
            if "norm" not in name:
                p.zero_()
        for layer in mods.layers:
            layer.eh_proj.weight[:, :h] = torch.eye(h)
    return mods


def mtp_llm(model, tokenizer, mods=None, k=3, path=None, batch=4) -> LLM:
    cfg = {"method": "mtp", "num_speculative_tokens": k, "adaptive": False}
    if path is not None:
        cfg["model"] = str(path)
    return LLM.from_model(model, tokenizer, speculative_config=cfg, max_batch_size=batch, draft_model=mods)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_mtp_equals_plain(tokenizer, dtype):
    target = tiny_model("qwen3", dtype)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = LLM.from_model(target, tokenizer, max_batch_size=4).generate(PROMPTS, params)
    for mods in (random_mtp(target), copy_mtp(target)):
        spec = mtp_llm(target, tokenizer, mods).generate(PROMPTS, params)
        assert [s.token_ids for s in spec] == [p.token_ids for p in plain]


def test_copy_modules_get_accepted(tokenizer):
    target = tiny_model("qwen3", torch.float32, tie_word_embeddings=True)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = LLM.from_model(target, tokenizer, max_batch_size=4).generate(PROMPTS, params)
    spec = mtp_llm(target, tokenizer, copy_mtp(target), k=2).generate(PROMPTS, params)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    assert sum(s.stats["accepted_tokens"] for s in spec) > 0


@torch.inference_mode()
def reference_drafts(model, mods: MTPModules, ids: list[int], k: int) -> list[int]:
    """Greedy MTP drafts recomputed from scratch: every module over the whole sequence."""
    n = len(ids)
    t = torch.tensor([ids[:-1]])
    out = model(t, torch.arange(n - 1)[None], model.new_cache(1, n + 8), hidden_layers=(-1,))
    h = out.hidden[len(model.model.layers) - 1]  # [1, n-1, H]: h^0 at positions 0..n-2
    seq = list(ids)
    c = mods.config
    for d in range(k):
        cache = KVCache(1, 1, c.num_key_value_heads, c.head_dim, n + 72, model.dtype)
        layer = mods.layers[d]
        layer.block.self_attn.index = 0  # its own fresh one-layer cache
        step = partial_inputs(model, torch.arange(n - 1)[None], cache, torch.tensor([0]), torch.tensor([0]))
        emb = model.model.embed_tokens(torch.tensor([seq[d + 1 : n + d]]))  # t_{i+d+1}, i = 0..n-2
        h = layer(emb, h, step)
        layer.block.self_attn.index = d
        seq.append(int(padded_linear(layer.norm(h[0, -1]), model.head_weight, None).argmax()))
    return seq[n:]


def test_incremental_drafts_match_from_scratch(tokenizer):
    """The per-module caches and carried hidden states stay exactly in step."""
    target = tiny_model("llama", torch.float32, tie_word_embeddings=True)
    mods = copy_mtp(target, 3)
    with torch.no_grad():  # keep the copy behaviour (some acceptance) but make every part matter
        g = torch.Generator().manual_seed(0)
        for name, p in mods.named_parameters():
            if "norm" not in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    llm = mtp_llm(target, tokenizer, mods, k=3, batch=2)
    prop = llm.engine.proposer
    seen = []
    original = prop.propose

    def recording(requests, num_tokens):
        draft = original(requests, num_tokens)
        seen.extend((list(r.all_ids), draft.tokens[i]) for i, r in enumerate(requests) if draft.tokens[i])
        return draft

    prop.propose = recording
    outs = llm.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    assert sum(o.stats["accepted_tokens"] for o in outs) > 0, "acceptance must move the caches unevenly"
    assert len(seen) > 10
    for ids, drafted in seen:
        assert drafted == reference_drafts(target, prop.mtp, ids, len(drafted))


def test_checkpoint_round_trip_and_errors(tokenizer, tmp_path):
    target = tiny_model("qwen2", torch.float32)
    mods = random_mtp(target, 2, intermediate_size=96)
    save_mtp(mods, tmp_path, intermediate_size=96)
    cfg = json.loads((tmp_path / "mtp.json").read_text())
    assert cfg == {"format": "draftwise-mtp", "num_modules": 2, "intermediate_size": 96}
    loaded = load_mtp(tmp_path, target.config)
    for k, v in mods.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert "layers.1.block.self_attn.q_proj.bias" in loaded.state_dict()  # qwen2 block

    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    plain = LLM.from_model(target, tokenizer, max_batch_size=4).generate(PROMPTS, params)
    spec = mtp_llm(target, tokenizer, path=tmp_path).generate(PROMPTS, params)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]

    with pytest.raises(BadInput, match="does not fit the target"):
        load_mtp(tmp_path, tiny_model("llama").config)  # no q/k/v biases in a llama block
    with pytest.raises(BadInput, match="needs MTP modules"):
        mtp_llm(target, tokenizer)


def test_sampled_mtp_is_seed_reproducible_and_top_k1_is_greedy(tokenizer):
    target = tiny_model("qwen3", torch.float32, std=0.1, tie_word_embeddings=True)
    llm = mtp_llm(target, tokenizer, copy_mtp(target))
    check_seeded_and_top1_greedy(llm, target, tokenizer, PROMPTS, max_tokens=16)


def test_long_new_prompt_beside_a_long_context_stays_in_the_cache():
    from draftwise.request import RequestState
    from draftwise.speculators.mtp import MTPProposer

    target = tiny_model("llama", torch.float32)
    mods = random_mtp(target, 2)
    hid = target.config.hidden_size
    g = torch.Generator().manual_seed(0)

    def request(rid, prompt, row, prop_list):
        req = RequestState(rid, prompt, SamplingParams(temperature=0.0, max_tokens=8), row=row)
        req.output_ids = [7]
        h = torch.randn(len(prompt), hid, generator=g)
        for prop in prop_list:
            prop.begin(req)
            prop.on_hidden(req, {1: h})
        return req

    prop = MTPProposer(target, mods, 2, 170, 2)
    alone = MTPProposer(target, mods, 2, 170, 2)
    a = request("a", [5, 6, 7] * 50, 0, [prop])
    prop.propose([a], [2])
    a.output_ids.append(9)
    prop.on_hidden(a, {1: torch.randn(1, hid, generator=g)})
    b = request("b", list(range(3, 153)), 1, [prop, alone])
    assert prop.states["a"].cached[0] + len(b.all_ids) > prop.cache.capacity
    both = prop.propose([a, b], [2, 2])
    assert both.tokens[1] == alone.propose([b], [2]).tokens[0]
