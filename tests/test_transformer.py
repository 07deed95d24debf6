"""The native decoder against transformers' own implementation, and the KV cache mechanics."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from draftwise.models.config import ModelConfig, UnsupportedArchitecture
from draftwise.models.transformer import Transformer

COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def hf_config(arch: str):
    if arch == "llama":  # Llama 3 rope scaling
        return tf.LlamaConfig(**COMMON, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    if arch == "llama-linear":
        return tf.LlamaConfig(**COMMON, rope_scaling={"rope_type": "linear", "factor": 2.0})
    if arch == "qwen2":
        return tf.Qwen2Config(**COMMON)
    if arch == "qwen3":
        return tf.Qwen3Config(**COMMON, head_dim=32)
    if arch == "mistral":
        return tf.MistralConfig(**COMMON, tie_word_embeddings=True)
    raise AssertionError(arch)


def native_and_hf(arch: str):
    torch.manual_seed(0)
    hf = tf.AutoModelForCausalLM.from_config(hf_config(arch)).float().eval()
    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
    model = Transformer(cfg).float().eval()
    wanted = model.state_dict().keys()
    model.load_state_dict({k: v for k, v in hf.state_dict().items() if k in wanted}, strict=True)
    return model, hf


@pytest.mark.parametrize("arch", ["llama", "llama-linear", "qwen2", "qwen3", "mistral"])
def test_logits_match_transformers(arch):
    model, hf = native_and_hf(arch)
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits  # [2, 40, vocab]
    cache = model.new_cache(2, 64)
    out = model(ids, torch.arange(40).expand(2, 40), cache).logits
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() <= 1e-4 * max(scale, 1.0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_incremental_decode_matches_full_pass(arch):
    model, hf = native_and_hf(arch)
    ids = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        ref = hf(ids).logits[0]
    cache = model.new_cache(1, 64)
    model(ids[:, :20], torch.arange(20)[None], cache)
    cache.set_length(0, 20)
    for i in range(20, 30):
        out = model(ids[:, i : i + 1], torch.tensor([[i]]), cache).logits[0, 0]
        cache.set_length(0, i + 1)
        assert (out - ref[i]).abs().max().item() < 1e-4


def test_hidden_states_and_logits_at():
    model, _ = native_and_hf("llama")
    ids = torch.randint(0, 300, (1, 10))
    cache = model.new_cache(1, 32)
    full = model(ids, torch.arange(10)[None], cache, hidden_layers=[0, -1])
    assert set(full.hidden) == {0, 1} and full.hidden[0].shape == (1, 10, 64)
    picked = model(ids, torch.arange(10)[None], cache, logits_at=torch.tensor([[3, 9]])).logits
    assert torch.equal(picked[0], full.logits[0, [3, 9]])


def test_tree_step_equals_each_path_alone():
    """A tree pass gives each node the logits of running its root-to-node path alone."""
    model, _ = native_and_hf("qwen2")
    prompt = torch.randint(0, 300, (1, 12))
    # root r, children a, b; a's child c:   r - a - c
    #                                          \- b
    tokens = torch.tensor([[7, 11, 13, 17]])  # r, a, b, c
    parents = [-1, 0, 0, 1]  # in the fed sequence (index 0 is the root)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    for i, p in enumerate(parents):
        mask[0, i, i] = True
        while p >= 0:
            mask[0, i, p] = True
            p = parents[p]
    depth = torch.tensor([[12, 13, 13, 14]])
    cache = model.new_cache(1, 64)
    model(prompt, torch.arange(12)[None], cache)
    cache.set_length(0, 12)
    tree = model(tokens, depth, cache, tree_mask=mask).logits[0]
    for node, path in {1: [7, 11], 2: [7, 13], 3: [7, 11, 17]}.items():
        ids = torch.cat([prompt, torch.tensor([path])], dim=1)
        c = model.new_cache(1, 64)
        alone = model(ids, torch.arange(ids.shape[1])[None], c).logits[0, -1]
        assert (tree[node] - alone).abs().max().item() < 1e-5


def test_keep_path_index_copies_accepted_nodes():
    model, _ = native_and_hf("llama")
    cache = model.new_cache(1, 32)
    cache.k[:, 0, :, 5] = 1.0
    cache.k[:, 0, :, 7] = 2.0
    cache.keep_path(0, 4, [4, 7])
    assert cache.lengths[0].item() == 6
    assert torch.all(cache.k[:, 0, :, 5] == 2.0)


def test_unsupported_architecture_is_named():
    with pytest.raises(UnsupportedArchitecture, match="gpt2.*supports: llama, qwen2, qwen3, mistral"):
        ModelConfig.from_hf_dict({"model_type": "gpt2"})
