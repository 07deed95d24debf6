"""`medusa`: heads propose a token tree; lossless, tree logits match paths run alone, checkpoints load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model, check_seeded_and_top1_greedy
from draftwise.api import LLM
from draftwise.engine.step import build_verify_batch
from draftwise.errors import BadInput
from draftwise.sampling import SamplingParams
from draftwise.speculators.medusa import MedusaHeads, load_medusa, save_medusa
from draftwise.tree import TreeShape, path_to

PROMPTS = ["abcabcabcabcabc", "the cat sat on the mat. the cat sat on the", "x = 1\nx = 1\nx = 1\n", "zz"]


def random_heads(model, num_heads=3, num_layers=1, own_lm_head=False, seed=0, std=0.05) -> MedusaHeads:
    torch.manual_seed(seed)
    heads = MedusaHeads(model.config.hidden_size, model.config.vocab_size, num_heads, num_layers, own_lm_head)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, std)
        for head in heads.lm_heads:  # heads as trained start from the target's LM head
            head.weight.copy_(model.head_weight.float() + 0.05 * torch.randn_like(head.weight))
    return heads


def medusa_llm(model, tokenizer, heads=None, k=10, tree=None, model_path=None, batch=4) -> LLM:
    cfg = {"method": "medusa", "num_speculative_tokens": k, "adaptive": False}
    if tree is not None:
        cfg["tree"] = tree
    if model_path is not None:
        cfg["model"] = str(model_path)
    return LLM.from_model(model, tokenizer, speculative_config=cfg, max_batch_size=batch, draft_model=heads)


@pytest.mark.parametrize("dtype,own", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)])
def test_greedy_medusa_equals_plain(tokenizer, dtype, own):
    target = tiny_model("qwen2", dtype)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = LLM.from_model(target, tokenizer, max_batch_size=4).generate(PROMPTS, params)
    spec = medusa_llm(target, tokenizer, random_heads(target, own_lm_head=own)).generate(PROMPTS, params)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    assert sum(s.stats["accepted_tokens"] for s in spec) > 0
    assert sum(s.stats["target_passes"] for s in spec) < sum(p.stats["target_passes"] for p in plain)


def test_tree_step_logits_match_each_path_alone(tokenizer):
    target = tiny_model("llama", torch.float32)
    llm = medusa_llm(target, tokenizer, random_heads(target), k=12, batch=2)
    eng = llm.engine
    eng.add_request(tokenizer.encode("hi"), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    req = eng.add_request(tokenizer.encode("hello there"), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    eng.step()  # prefill both; req lives in row 1
    draft = eng.proposer.propose([req], [12])
    tokens, parents = draft.tokens[0], draft.parents[0]
    assert len(tokens) == 12 and parents != list(range(-1, 11)), "the draft must be a real tree"
    length = int(eng.cache.lengths[req.row])
    rows = torch.tensor([req.row])
    batch = build_verify_batch([req], draft, [length], target.device)
    tree_logits = target(batch.ids, batch.positions, eng.cache, tree_mask=batch.tree_mask, rows=rows).logits[0]
    for j in range(len(tokens)):  # nothing was committed: the cache still ends at `length`
        ids = [req.output_ids[-1]] + [tokens[p] for p in path_to(parents, j)]
        alone = target(torch.tensor([ids]), length + torch.arange(len(ids))[None], eng.cache, rows=rows).logits[0, -1]
        torch.testing.assert_close(tree_logits[j + 1], alone, atol=1e-5, rtol=1e-5)


def test_configured_tree_shape_and_budget_are_respected(tokenizer):
    target = tiny_model("llama", torch.float32)
    tree = [[0], [1], [0, 0], [2], [0, 1], [0, 0, 0], [0, 0, 0, 0]]  # depth 4 > 3 heads: cut
    llm = medusa_llm(target, tokenizer, random_heads(target), k=5, tree=tree, batch=1)
    eng = llm.engine
    req = eng.add_request(tokenizer.encode("hello"), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    eng.step()
    draft = eng.proposer.propose([req], [5])
    assert draft.parents[0] == TreeShape.from_paths(tree).truncate(5).parents == [-1, -1, 0, -1, 0]
    draft = eng.proposer.propose([req], [64])
    assert len(draft.tokens[0]) == 6  # the depth-4 path was dropped
    assert draft.tokens[0][0] != draft.tokens[0][1]  # distinct top-1 / top-2 candidates


def public_state(heads: MedusaHeads) -> dict[str, torch.Tensor]:
    """The heads' weights in the public Medusa naming."""
    sd = {}
    for i in range(heads.num_heads):
        for j in range(heads.num_layers):
            sd[f"{i}.{j}.linear.weight"] = heads.blocks[i][j].weight.detach().clone()
            sd[f"{i}.{j}.linear.bias"] = heads.blocks[i][j].bias.detach().clone()
        sd[f"{i}.{heads.num_layers}.weight"] = heads.lm_heads[i].weight.detach().clone()
    return sd


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_public_medusa_checkpoint_loads_and_decodes(tokenizer, tmp_path, fmt):
    from safetensors.torch import save_file

    target = tiny_model("qwen2", torch.float32)
    heads = random_heads(target, num_heads=2, num_layers=2, own_lm_head=True)
    sd = public_state(heads)
    if fmt == "safetensors":
        save_file(sd, str(tmp_path / "medusa_lm_head.safetensors"))
    else:
        torch.save(sd, tmp_path / "medusa_lm_head.pt")
    (tmp_path / "config.json").write_text(json.dumps(
        {"medusa_num_heads": 2, "medusa_num_layers": 2, "base_model_name_or_path": "tiny"}))
    loaded = load_medusa(tmp_path)
    h = torch.randn(3, target.config.hidden_size)
    x = h
    for j in range(2):  # the public head, written out: x + SiLU(W x + b), then W2
        x = x + F.silu(x @ sd[f"0.{j}.linear.weight"].T + sd[f"0.{j}.linear.bias"])
    torch.testing.assert_close(loaded(h)[0], x @ sd["0.2.weight"].T)

    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    plain = LLM.from_model(target, tokenizer, max_batch_size=4).generate(PROMPTS, params)
    spec = medusa_llm(target, tokenizer, model_path=tmp_path).generate(PROMPTS, params)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]


def test_our_layout_round_trips(tmp_path):
    target = tiny_model("llama", torch.float32)
    for own in (False, True):
        heads = random_heads(target, num_heads=3, own_lm_head=own)
        save_medusa(heads, tmp_path / str(own))
        loaded = load_medusa(tmp_path / str(own))
        h = torch.randn(2, target.config.hidden_size)
        torch.testing.assert_close(loaded(h, target.head_weight), heads(h, target.head_weight))


def test_missing_or_mismatched_heads_are_clear_errors(tokenizer, tmp_path):
    target = tiny_model("llama", torch.float32)
    with pytest.raises(BadInput, match="needs heads"):
        medusa_llm(target, tokenizer)
    with pytest.raises(BadInput, match="not a Medusa checkpoint"):
        medusa_llm(target, tokenizer, model_path=tmp_path)
    wrong = MedusaHeads(32, target.config.vocab_size, 2)
    with pytest.raises(BadInput, match="hidden size"):
        medusa_llm(target, tokenizer, wrong)


def test_sampled_medusa_is_seed_reproducible_and_top_k1_is_greedy(tokenizer):
    target = tiny_model("qwen2", torch.float32, std=0.1)
    llm = medusa_llm(target, tokenizer, random_heads(target))
    check_seeded_and_top1_greedy(llm, target, tokenizer, PROMPTS, max_tokens=16)
