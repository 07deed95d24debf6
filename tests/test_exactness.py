"""Batch invariance of the native model: the property greedy exactness rests on.

A token's logits must be bit-identical whether it is decoded alone, verified among up to
16 tokens, or run in a batch beside other sequences of other lengths.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model


def decode_alone(model, prompt: torch.Tensor, seq: torch.Tensor) -> list[torch.Tensor]:
    cache = model.new_cache(1, 128)
    n = prompt.shape[1]
    model(prompt, torch.arange(n)[None], cache)
    cache.set_length(0, n)
    out = []
    for i in range(seq.shape[1]):
        out.append(model(seq[:, i : i + 1], torch.tensor([[n + i]]), cache).logits[0, 0])
        cache.set_length(0, n + i + 1)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_chunked_passes_equal_one_token_passes(arch, dtype):
    model = tiny_model(arch, dtype, hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    torch.manual_seed(1)
    prompt, seq = torch.randint(0, 260, (1, 37)), torch.randint(0, 260, (1, 30))
    ref = decode_alone(model, prompt, seq)
    cache = model.new_cache(1, 128)
    model(prompt, torch.arange(37)[None], cache)
    cache.set_length(0, 37)
    got, done = [], 0
    for t in [2, 5, 1, 9, 3, 4, 6]:  # passes over different token counts
        logits = model(seq[:, done : done + t], (37 + done + torch.arange(t))[None], cache).logits[0]
        got += list(logits)
        done += t
        cache.set_length(0, 37 + done)
    assert done == 30
    for i, (a, b) in enumerate(zip(ref, got)):
        assert torch.equal(a, b), f"token {i}: max diff {(a.float() - b.float()).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_rows_equal_single_rows(dtype):
    model = tiny_model("llama", dtype)
    torch.manual_seed(2)
    prompts = [torch.randint(0, 260, (1, n)) for n in (5, 19, 11)]
    seqs = [torch.randint(0, 260, (1, 6)) for _ in prompts]
    refs = [decode_alone(model, p, s) for p, s in zip(prompts, seqs)]
    cache = model.new_cache(3, 128)
    for row, p in enumerate(prompts):  # prefill each row on its own
        n = p.shape[1]
        model(p, torch.arange(n)[None], cache, rows=torch.tensor([row]))
        cache.set_length(row, n)
    lens = [p.shape[1] for p in prompts]
    for step in range(0, 6, 2):  # all three rows together, two tokens a pass
        ids = torch.cat([s[:, step : step + 2] for s in seqs])
        pos = torch.tensor([[n + step, n + step + 1] for n in lens])
        logits = model(ids, pos, cache).logits
        for row in range(3):
            for j in range(2):
                assert torch.equal(logits[row, j], refs[row][step + j])
            cache.set_length(row, lens[row] + step + 2)
