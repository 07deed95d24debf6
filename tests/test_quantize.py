"""int8 weight-only quantization: accuracy close to the model, exactness kept within it."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model
from draftwise.api import LLM
from draftwise.models.quantize import Int8Linear, quantize
from draftwise.sampling import SamplingParams


def test_int8_linear_is_close_and_row_invariant():
    torch.manual_seed(0)
    w, x = torch.randn(96, 64), torch.randn(9, 64, dtype=torch.bfloat16)
    lin = Int8Linear(w, None, torch.bfloat16)
    assert (lin.dequantized() - w).abs().max() <= w.abs().amax(1).max() / 127
    all_rows = lin.rows(x)
    for i in range(9):
        assert torch.equal(lin.rows(x[i : i + 1])[0], all_rows[i])


@pytest.mark.parametrize("method", ["int8", "int8-all"])
def test_quantized_model_tracks_the_original(method):
    model = tiny_model("qwen2", torch.bfloat16)
    q = quantize(copy.deepcopy(model), method)
    assert q.quantization == method and isinstance(q.model.layers[0].mlp.up_proj, Int8Linear)
    assert isinstance(q.quantized_head, Int8Linear) == (method == "int8-all")
    ids = torch.randint(0, 260, (1, 40))
    a = model(ids, torch.arange(40)[None], model.new_cache(1, 64)).logits
    b = q(ids, torch.arange(40)[None], q.new_cache(1, 64)).logits
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree >= 0.8, agree


@pytest.mark.parametrize("method", ["int8", "int8-all"])
def test_greedy_speculation_is_exact_within_int8(tokenizer, method):
    q = quantize(tiny_model("qwen2", torch.bfloat16), method)
    prompts = ["abcabcabcabc", "one two one two one"]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain = LLM.from_model(q, tokenizer, max_batch_size=2).generate(prompts, params)
    spec = LLM.from_model(q, tokenizer, max_batch_size=2,
                          speculative_config={"method": "ngram", "adaptive": False}).generate(prompts, params)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    assert sum(s.stats["accepted_tokens"] for s in spec) > 0
