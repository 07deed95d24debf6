"""Batch invariance of the native model: the property greedy exactness rests on; and every
registered speculator, exact through the engine.

A token's logits must be bit-identical whether it is decoded alone, verified among up to
16 tokens in a chain or as a node of a tree, or run in a batch beside other sequences of
other lengths, at short and long contexts (across the attention's key blocks).

Every method in the registry (`available_methods()`, read when the tests are collected, so
a new method is picked up by its registration alone) must give plain decoding's tokens,
greedy, with a fixed draft length and with the engine's controller; the same tokens again
for the same seed; and plain greedy's tokens under top_k = 1 sampling. A method that cannot
be built from its name alone gets a recipe in `RECIPES` (its weights, made up here). So does
the example method of docs/adding-a-speculator.md, run as the page shows it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import (VARIANTS, check_seeded_and_top1_greedy, check_tree_pass, decode_alone, oracle_tree_outputs,
                      tiny_model)
from draftwise.api import LLM
from draftwise.engine.step import prefill
from draftwise.request import RequestState
from draftwise.sampling import SamplingParams
from draftwise.speculators import available_methods, base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch, context, heads, kv_heads", [
    ("llama", 37, 6, 2), ("qwen2", 37, 6, 2), ("qwen3", 37, 6, 2), ("qwen2", 700, 6, 2),
    ("qwen2", 37, 4, 4), ("qwen2", 130, 12, 2),  # 1 and 6 query heads per KV head
])
@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_passes_equal_one_token_passes(arch, dtype, context, heads, kv_heads, variant):
    model = tiny_model(arch, dtype, hidden_size=96, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=2048, variant=variant)
    torch.manual_seed(1)
    prompt, seq = torch.randint(0, 260, (1, context)), torch.randint(0, 260, (1, 30))
    ref = decode_alone(model, prompt, seq)
    cache = model.new_cache(1, context + 64)
    model(prompt, torch.arange(context)[None], cache)
    cache.set_length(0, context)
    got, done = [], 0
    for t in [2, 5, 1, 9, 3, 4, 6]:  # passes over different token counts
        logits = model(seq[:, done : done + t], (context + done + torch.arange(t))[None], cache).logits[0]
        got += list(logits)
        done += t
        cache.set_length(0, context + done)
    assert done == 30
    for i, (a, b) in enumerate(zip(ref, got)):
        assert torch.equal(a, b), f"token {i}: max diff {(a.float() - b.float()).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_tree_nodes_equal_their_path_decoded_alone(dtype, variant):
    """Two rows verified together as trees whose paths cross key blocks (64 slots): each
    node on the path gives the logits of decoding that path one token at a time."""
    model = tiny_model("qwen2", dtype, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                       max_position_embeddings=2048, variant=variant)
    torch.manual_seed(3)
    prompts = [torch.randint(0, 260, (1, n)) for n in (58, 250)]
    paths = [torch.randint(0, 260, (1, 7)) for _ in prompts]
    check_tree_pass(model, prompts, paths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_tree_speculation_equals_plain_decoding(dtype, variant, tokenizer):
    """Through the engine: mixed prompt lengths (one past the fused-prefill threshold),
    more prompts than rows, contexts crossing key blocks; the oracle's trees are accepted
    deep, at scattered slots. Output must be plain decoding's, token for token."""
    model = tiny_model("qwen2", dtype, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                       max_position_embeddings=2048, variant=variant)
    torch.manual_seed(4)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (5, 150, 61, 20, 300, 90)]
    params = SamplingParams(temperature=0.0, max_tokens=70, ignore_eos=True)
    plain = LLM.from_model(model, tokenizer, max_batch_size=3).generate(prompts, params)
    reqs = oracle_tree_outputs(model, tokenizer, prompts, params, plain, max_batch_size=3)
    assert [r.output_ids for r in reqs] == [o.token_ids for o in plain]
    passes = sum(r.stats.target_passes for r in reqs)
    assert passes < 0.5 * sum(len(r.output_ids) for r in reqs), "the oracle's paths were hardly accepted"


def test_prefill_does_not_depend_on_its_batch():
    """Prompts prefilled together (short ones and ones past the fused-kernel threshold)
    leave the same cache and first-token logits as each prompt prefilled alone."""
    model = tiny_model("llama", torch.bfloat16, max_position_embeddings=1024)
    torch.manual_seed(5)
    prompts = [torch.randint(0, 260, (n,)).tolist() for n in (9, 200, 70, 131)]
    params = SamplingParams(temperature=0.0, max_tokens=1)

    def run(group: list[int]):
        cache = model.new_cache(len(prompts), 400)
        reqs = [RequestState(f"r{i}", prompts[i], params, row=i) for i in group]
        results, _ = prefill(model, cache, reqs)
        return cache, {i: res.tokens for i, res in zip(group, results)}

    together, first = run([0, 1, 2, 3])
    for i, p in enumerate(prompts):
        alone, first_alone = run([i])
        n = len(p)
        assert torch.equal(together.k[:, i, :, :n], alone.k[:, i, :, :n])
        assert torch.equal(together.v[:, i, :, :n], alone.v[:, i, :, :n])
        assert first[i] == first_alone[i]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["plain", "torch-attention"])
def test_batched_rows_equal_single_rows(dtype, variant):
    model = tiny_model("llama", dtype, variant=variant)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_shape_passes_are_exact_too(dtype, tokenizer):
    """The CUDA path's static shapes (every cache row, BLOCK tokens, keys over the whole
    cache), forced on the CPU: chunked passes still equal one-token passes, tree nodes their
    paths, and speculation through the engine gives plain decoding's output, equal to the
    output of the same model run without static shapes (attention in the same torch
    operations: the CPU's C kernel sums in another order)."""
    model = tiny_model("qwen2", dtype, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                       max_position_embeddings=2048)
    model.static_shapes = True
    torch.manual_seed(6)
    prompt, seq = torch.randint(0, 260, (1, 70)), torch.randint(0, 260, (1, 12))
    ref = decode_alone(model, prompt, seq)
    cache = model.new_cache(1, 70 + 64)
    model(prompt, torch.arange(70)[None], cache)
    cache.set_length(0, 70)
    got = list(model(seq[:, :5], (70 + torch.arange(5))[None], cache).logits[0])
    cache.set_length(0, 75)
    got += list(model(seq[:, 5:], (75 + torch.arange(7))[None], cache).logits[0])
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    check_tree_pass(model, [torch.randint(0, 260, (1, n)) for n in (58, 130)], [torch.randint(0, 260, (1, 6))] * 2)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (5, 150, 61)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = LLM.from_model(model, tokenizer, max_batch_size=2).generate(prompts, params)
    reqs = oracle_tree_outputs(model, tokenizer, prompts, params, plain, max_batch_size=2)
    assert [r.output_ids for r in reqs] == [o.token_ids for o in plain]
    model.static_shapes, model.attention_kernel = False, False
    assert [o.token_ids for o in LLM.from_model(model, tokenizer, max_batch_size=2).generate(prompts, params)] \
        == [o.token_ids for o in plain]


# --- every registered speculator ---------------------------------------------------------

EXACT_PROMPTS = ["hello world hello world", "the cat sat on the mat", "abcabcabcabc"]
NEVER_TRAINS = {"min_tokens": 10**9}  # the adaptive learner: no training thread at work during the check


def _eagle(target):
    from test_eagle import random_head

    return {}, random_head(target)


def _medusa(target):
    from test_medusa import random_heads

    return {}, random_heads(target)


def _mtp(target):
    from test_mtp import random_mtp

    return {}, random_mtp(target)


# method -> target -> (its extra config, the draft model / head passed as `draft_model`)
RECIPES = {
    "draft_model": lambda target: ({}, tiny_model("qwen2", target.dtype, seed=3, num_hidden_layers=1)),
    "eagle": _eagle,
    "medusa": _medusa,
    "mtp": _mtp,
    "adaptive": lambda target: ({"learner": NEVER_TRAINS}, None),
}


def check_method_is_exact(method: str, tokenizer) -> None:
    """`method` (registered) on a tiny target: greedy equals plain decoding with a fixed draft
    length and with the engine's controller; seeded sampling repeats; top_k = 1 is greedy."""
    target = tiny_model("qwen2", torch.float32, seed=0, num_hidden_layers=4)
    extra, draft = RECIPES.get(method, lambda t: ({}, None))(target)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = [o.token_ids for o in LLM.from_model(target, tokenizer, max_batch_size=3).generate(EXACT_PROMPTS, greedy)]
    for adaptive in (False, None):
        spec = {"method": method, "num_speculative_tokens": 6, **extra, "adaptive": adaptive}
        llm = LLM.from_model(target, tokenizer, speculative_config=spec, max_batch_size=3, draft_model=draft)
        try:
            outs = llm.generate(EXACT_PROMPTS, greedy)
            assert [o.token_ids for o in outs] == plain, f"{method} (adaptive={adaptive}) changed greedy output"
            if adaptive is False:
                assert sum(o.stats["draft_tokens"] for o in outs) > 0, f"{method} drafted nothing: nothing was checked"
                check_seeded_and_top1_greedy(llm, target, tokenizer, EXACT_PROMPTS)
        finally:
            llm.close()


@pytest.mark.parametrize("method", available_methods())
def test_every_registered_speculator_is_exact(method, tokenizer):
    check_method_is_exact(method, tokenizer)


DOC = Path(__file__).parent.parent / "docs" / "adding-a-speculator.md"


def test_the_documented_example_speculator_is_exact(tokenizer, monkeypatch):
    """docs/adding-a-speculator.md's example, run as written: its module registers the
    method on import (here into a copy of the registry), and it passes the same checks."""
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    exec(compile(code, str(DOC), "exec"), {"__name__": "bigram"})
    assert "bigram" in available_methods()
    assert len(code.splitlines()) <= 70  # the page promises a short example
    check_method_is_exact("bigram", tokenizer)
