"""EAGLE heads: exact output whatever the head, public checkpoint layouts, dynamic trees."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_w4a8, tiny_model
from draftwise.api import LLM
from draftwise.sampling import SamplingParams
from draftwise.speculators.eagle import EagleHead, config_for_target, init_head_from_target, load_eagle_head, save_eagle_head

PROMPTS = ["abcabcabcabcabc", "the cat sat on the mat. the cat sat on the", "x = 1\nx = 1\nx = 1\n", "zz"]


def random_head(target, style: str = "eagle3", draft_vocab: int | None = 100, seed: int = 0) -> EagleHead:
    cfg = config_for_target(target.config, style, draft_vocab)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(target.config.vocab_size, generator=g)[: cfg.draft_vocab_size].sort().values
    head = init_head_from_target(cfg, target, ids if cfg.reduced_vocab else None, seed)
    with torch.no_grad():  # larger weights than a fresh init, so the head is not near-constant
        for name, p in head.named_parameters():
            if "norm" not in name and "lm_head" not in name:
                p.normal_(0.0, 0.1, generator=g)
    return head.to(target.dtype)


def eagle_llm(target, tokenizer, head_or_path, k: int = 8, batch: int = 4, **extra) -> LLM:
    cfg = {"method": "eagle", "num_speculative_tokens": k, "adaptive": False, **extra}
    if isinstance(head_or_path, EagleHead):
        return LLM.from_model(target, tokenizer, speculative_config=cfg, max_batch_size=batch, draft_model=head_or_path)
    return LLM.from_model(target, tokenizer, speculative_config={**cfg, "model": str(head_or_path)},
                          max_batch_size=batch)


@pytest.mark.parametrize("style,dtype", [("eagle3", torch.float32), ("eagle1", torch.bfloat16)])
def test_greedy_eagle_equals_plain(tokenizer, style, dtype):
    target = tiny_model("qwen2", dtype, seed=0, num_hidden_layers=4)
    head = random_head(target, style)
    n = 24 if dtype == torch.float32 else 16
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    plain = LLM.from_model(target, tokenizer, max_batch_size=4).generate(PROMPTS, params)
    spec = eagle_llm(target, tokenizer, head).generate(PROMPTS, params)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    assert sum(s.stats["draft_tokens"] for s in spec) > 0


@pytest.mark.parametrize("extra", [{}, {"lookup": "ngram"}])  # with a lookup draft grafted on (graft.py)
def test_sampled_eagle_is_seed_reproducible_and_top_k1_is_greedy(tokenizer, extra):
    target = tiny_model("llama", torch.float32, seed=1, num_hidden_layers=4)
    llm = eagle_llm(target, tokenizer, random_head(target, "eagle1", None), k=6, eagle_tree_top_k=2, **extra)
    sp = SamplingParams(max_tokens=12, temperature=0.9, seed=5, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(PROMPTS, sp)] == [o.token_ids for o in llm.generate(PROMPTS, sp)]
    plain = LLM.from_model(target, tokenizer, max_batch_size=4)
    greedy = plain.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    top1 = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=1.3, top_k=1, seed=2, ignore_eos=True))
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]


def test_dynamic_tree_is_valid_and_ranked(tokenizer):
    target = tiny_model("llama", torch.float32, seed=2, num_hidden_layers=4)
    llm = eagle_llm(target, tokenizer, random_head(target), k=12, eagle_tree_top_k=3, eagle_tree_depth=4)
    engine, proposer = llm.engine, llm.engine.proposer
    reqs = [engine.add_request(tokenizer.encode(p), SamplingParams(temperature=0.0, max_tokens=30)) for p in PROMPTS]
    engine.step()  # prefill
    budgets = [12, 5, 1, 9]
    draft = proposer.propose(reqs, budgets)
    for tokens, parents, n in zip(draft.tokens, draft.parents, budgets):
        assert 0 < len(tokens) <= n and len(parents) == len(tokens)
        depth = []
        for j, p in enumerate(parents):
            assert -1 <= p < j  # parents first
            depth.append(1 if p < 0 else depth[p] + 1)
        assert max(depth) <= min(4, n)
        for p in set(parents):  # siblings propose distinct tokens, at most top_k of them
            sib = [tokens[j] for j, q in enumerate(parents) if q == p]
            assert len(sib) == len(set(sib)) <= 3
    assert len(draft.tokens[0]) == 12 and len(draft.tokens[2]) == 1
    engine.run_until_done()  # drafting again after commits keeps the head cache consistent


def test_a_prompts_catch_up_is_prefill_not_the_cost_of_a_draft(tokenizer):
    # the head runs a request's prompt once, at its first draft: the engine's controller must
    # not read that as what each draft costs (it would switch speculation off on long prompts)
    target = tiny_model("llama", torch.float32, seed=2, num_hidden_layers=4)
    llm = eagle_llm(target, tokenizer, random_head(target), k=4, batch=1)
    engine, proposer = llm.engine, llm.engine.proposer
    req = engine.add_request(tokenizer.encode(" ".join(PROMPTS * 3)), SamplingParams(temperature=0.0, max_tokens=30))
    engine.step()  # prefill: the head has seen nothing yet
    first = proposer.propose([req], [4])
    assert first.prefill_seconds > 0
    engine.step()  # a speculative step: the next draft catches up on its few committed tokens only
    assert proposer.propose([req], [4]).prefill_seconds == 0.0
    engine.run_until_done()


def _public_eagle3(head: EagleHead) -> dict[str, torch.Tensor]:
    sd = {("midlayer." + k[len("layer."):]) if k.startswith("layer.") else k: v.clone()
          for k, v in head.state_dict().items()}
    t2d = torch.zeros(head.config.vocab_size, dtype=torch.bool)
    t2d[head.draft_ids()] = True
    sd["t2d"] = t2d
    sd["embed_tokens.weight"] = torch.zeros(head.config.vocab_size, head.config.hidden_size)
    return sd


def _reference_eagle3_logits(sd, cfg_json, target, ids: list[int], layers: list[int]) -> torch.Tensor:
    """EAGLE-3's draft math written out from the public description, on the checkpoint
    tensors: logits over the draft vocabulary after the last prompt pair [draft_vocab]."""
    h, nh, nkv = cfg_json["hidden_size"], cfg_json["num_attention_heads"], cfg_json["num_key_value_heads"]
    hd, eps = h // nh, cfg_json["rms_norm_eps"]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    with torch.inference_mode():
        t = torch.tensor([ids])
        out = target(t, torch.arange(len(ids))[None], target.new_cache(1, 64), hidden_layers=layers)
        nxt = int(out.logits[0, -1].argmax())
    feats = torch.cat([out.hidden[i][0] for i in layers], -1)  # [n, 3H]
    tokens = torch.tensor(ids[1:] + [nxt])  # token i+1 of pair i
    n = len(ids)
    x = feats @ sd["fc.weight"].T
    emb = target.model.embed_tokens.weight[tokens]
    a = torch.cat([rms(emb, sd["midlayer.input_layernorm.weight"]), rms(x, sd["midlayer.hidden_norm.weight"])], -1)
    q = (a @ sd["midlayer.self_attn.q_proj.weight"].T).view(n, nh, hd).transpose(0, 1)
    k = (a @ sd["midlayer.self_attn.k_proj.weight"].T).view(n, nkv, hd).transpose(0, 1)
    v = (a @ sd["midlayer.self_attn.v_proj.weight"].T).view(n, nkv, hd).transpose(0, 1)
    inv = 1.0 / (cfg_json["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.arange(n).float()[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(z):
        return z * cos + torch.cat([-z[..., hd // 2:], z[..., : hd // 2]], -1) * sin

    q, k = rope(q), rope(k)
    k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
    att = (q @ k.transpose(1, 2) / math.sqrt(hd)).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
    o = (att.softmax(-1) @ v).transpose(0, 1).reshape(n, nh * hd) @ sd["midlayer.self_attn.o_proj.weight"].T
    x = x + o
    m = rms(x, sd["midlayer.post_attention_layernorm.weight"])
    gate, up = m @ sd["midlayer.mlp.gate_proj.weight"].T, m @ sd["midlayer.mlp.up_proj.weight"].T
    x = x + (F.silu(gate) * up) @ sd["midlayer.mlp.down_proj.weight"].T
    return rms(x[-1], sd["norm.weight"]) @ sd["lm_head.weight"].T


def test_loads_public_eagle3_layout_and_matches_reference_math(tokenizer, tmp_path):
    from safetensors.torch import save_file

    target = tiny_model("llama", torch.float32, seed=3, num_hidden_layers=8)
    head = random_head(target, "eagle3", 64, seed=4)
    c = head.config
    cfg_json = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": c.hidden_size,
                "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": c.num_key_value_heads, "num_hidden_layers": 1, "rms_norm_eps": 1e-6,
                "rope_theta": c.rope_theta, "vocab_size": c.vocab_size, "draft_vocab_size": 64,
                "max_position_embeddings": 512}
    sd = _public_eagle3(head)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    loaded = load_eagle_head(tmp_path, target)
    # EAGLE-3 fuses the inputs of layers 2, L/2 and L-3: the outputs of our layers 1, 3, 4
    assert loaded.config.style == "eagle3" and loaded.config.feature_layers == [1, 3, 4]
    ids = tokenizer.encode("the cat sat on")
    want = _reference_eagle3_logits(sd, cfg_json, target, ids, [1, 3, 4])
    llm = eagle_llm(target, tokenizer, tmp_path, k=1, batch=1)
    req = llm.engine.add_request(ids, SamplingParams(temperature=0.0, max_tokens=8))
    llm.engine.step()
    proposer = llm.engine.proposer
    with torch.inference_mode():
        root, _ = proposer._catch_up([req])
        got = proposer.head.logits(root, target.head_weight)[0]
        tree = proposer._grow([req], [1], root)[0].best(1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert tree == ([int(loaded.to_target(want.argmax()[None])[0])], [-1])


def test_loads_public_eagle1_layout_and_stays_exact(tokenizer, tmp_path):
    target = tiny_model("llama", torch.float32, seed=5, num_hidden_layers=3)
    head = random_head(target, "eagle1", None, seed=6)
    c = head.config
    sd = {("layers.0." + k[len("layer."):]) if k.startswith("layer.") else k: v for k, v in head.state_dict().items()}
    assert "fc.bias" in sd and not any("input_layernorm" in k for k in sd)
    sd["embed_tokens.weight"] = target.model.embed_tokens.weight.detach().clone()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "num_hidden_layers": 1, "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta}))
    loaded = load_eagle_head(tmp_path, target)
    assert loaded.config.style == "eagle1" and loaded.config.feature_norm and not loaded.config.own_lm_head
    for k, v in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    plain = LLM.from_model(target, tokenizer, max_batch_size=4).generate(PROMPTS[:2], params)
    spec = eagle_llm(target, tokenizer, tmp_path).generate(PROMPTS[:2], params)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]


def test_our_layout_roundtrips_and_bad_heads_are_refused(tokenizer, tmp_path):
    from draftwise.errors import BadInput

    target = tiny_model("llama", torch.float32, seed=7, num_hidden_layers=4)
    head = random_head(target, "eagle3", 50)
    save_eagle_head(head, tmp_path / "ours", {"training": {"note": "test"}})
    loaded = load_eagle_head(tmp_path / "ours", target)
    assert loaded.config == head.config
    for k, v in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    other = tiny_model("llama", torch.float32, num_hidden_layers=4, hidden_size=32, intermediate_size=64, head_dim=8)
    with pytest.raises(BadInput, match="hidden size|features"):
        load_eagle_head(tmp_path / "ours", other)
    with pytest.raises(BadInput, match="needs a head"):
        LLM.from_model(target, tokenizer, speculative_config={"method": "eagle"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="not an EAGLE head"):
        load_eagle_head(tmp_path / "empty", target)


def test_head_on_kernels_drafts_like_the_plain_head(tokenizer):
    """with_kernels: bf16 on oneDNN's packed weights gives the plain head's outputs bit for
    bit (fused q/k/v and gate/up included); the original head is left untouched."""
    from draftwise.speculators.eagle import with_kernels
    from draftwise.speculators.eagle.head import KernelLinear

    target = tiny_model("llama", torch.bfloat16, seed=3, num_hidden_layers=4)
    head = random_head(target, "eagle3", 100).eval()
    fast = with_kernels(head, "none")
    if fast is head:
        pytest.skip("oneDNN cannot pack bf16 on this CPU")
    assert isinstance(fast.layer.self_attn.qkv_proj, KernelLinear) and isinstance(fast.lm_head, KernelLinear)
    assert not hasattr(fast.layer.self_attn, "q_proj") and isinstance(head.layer.self_attn.q_proj, torch.nn.Linear)
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 5, head.fc.in_features, generator=g).to(torch.bfloat16)
    emb = target.model.embed_tokens(torch.randint(0, 100, (2, 5), generator=g))
    positions = torch.arange(5).expand(2, 5)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    with torch.inference_mode():
        outs = []
        for m in (head, fast):
            x = m.stream_input(feat, emb, fused=True)
            q, k, v = m.project(x, emb, positions)
            outs.append(m.logits(m.finish(x, m.attend(q, k, v, mask)), target.head_weight))
    assert torch.equal(outs[0], outs[1])


@needs_w4a8()
def test_greedy_eagle_on_w4a8_all_target_equals_plain(tokenizer):
    """The head drafts on the w4a8 kernel beside a w4a8-all target; output stays the target's."""
    from draftwise.models.quantize import quantize
    from draftwise.speculators.eagle.head import KernelLinear

    target = quantize(tiny_model("qwen2", torch.bfloat16, seed=0, num_hidden_layers=4), "w4a8-all")
    head = random_head(target, "eagle3")
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    plain = LLM.from_model(target, tokenizer, max_batch_size=4).generate(PROMPTS, params)
    llm = eagle_llm(target, tokenizer, head)
    spec = llm.generate(PROMPTS, params)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    assert sum(s.stats["draft_tokens"] for s in spec) > 0
    drafting = llm.engine.proposer.head
    assert isinstance(drafting.layer.mlp.gate_up_proj, KernelLinear)


def stand_in_target(cfg, layers: int | None = None):
    """What load_eagle_head checks a head against, without the target's weights."""
    from types import SimpleNamespace

    n = layers or cfg.target_num_hidden_layers or max(cfg.feature_layers) + 4
    tcfg = SimpleNamespace(vocab_size=cfg.vocab_size, hidden_size=cfg.feature_size, num_hidden_layers=n)
    return SimpleNamespace(config=tcfg, device=torch.device("cpu"), dtype=torch.float32)


@pytest.mark.parametrize("name", sorted(__import__("draftwise.heads", fromlist=["SHIPPED"]).SHIPPED))
def test_shipped_heads_match_their_hashes_and_load(name, tmp_path):
    """Each shipped head's weights are the file its sha256 names, its config loads, and a
    copy with a damaged file, or a target of another shape, is refused in one line."""
    import json as _json
    import shutil

    from draftwise.errors import BadInput
    from draftwise.heads import SHIPPED, check_file
    from draftwise.speculators.eagle import EagleConfig

    head = SHIPPED[name]
    assert check_file(head) is None
    cfg = EagleConfig.model_validate(_json.loads((head.path / "config.json").read_text())["draftwise_eagle"])
    loaded = load_eagle_head(name, stand_in_target(cfg))
    assert loaded.config == cfg and sum(p.numel() for p in loaded.parameters()) > 0
    assert (head.path / "README.md").is_file()
    if cfg.target_num_hidden_layers is not None:
        with pytest.raises(BadInput, match="layer"):
            load_eagle_head(name, stand_in_target(cfg, layers=cfg.target_num_hidden_layers + 2))
    other = stand_in_target(cfg)
    other.config.vocab_size += 1
    with pytest.raises(BadInput, match="vocabulary"):
        load_eagle_head(name, other)
    copy = tmp_path / name
    shutil.copytree(head.path, copy)
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(BadInput, match="truncated or corrupt"):
        load_eagle_head(copy, stand_in_target(cfg))


def test_int8_stored_heads_round_trip_within_rounding(tokenizer, tmp_path):
    target = tiny_model("llama", torch.float32, seed=7, num_hidden_layers=4)
    head = random_head(target, "eagle3", 50)
    save_eagle_head(head, tmp_path / "int8", weights="int8")
    loaded = load_eagle_head(tmp_path / "int8", target)
    for k, v in head.state_dict().items():
        got = loaded.state_dict()[k]
        if v.is_floating_point() and v.dim() == 2:
            step = v.abs().amax(dim=1, keepdim=True) / 127  # one int8 step per row
            assert ((got - v).abs() <= step / 2 + 1e-6).all(), k
        else:
            torch.testing.assert_close(got, v)
