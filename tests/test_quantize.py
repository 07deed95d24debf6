"""Weight-only quantization (int8, int4): accuracy close to the model, exactness kept within it."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import needs_w4a8, tiny_model
from draftwise.api import LLM
from draftwise.models.quantize import (ALONE, FUSED, Int4Linear, Int8Linear, W4A8Linear, W8A8Linear, cpu_has_avx512_vnni,
                                       int8_per_channel, quantize)
from draftwise.sampling import SamplingParams


def test_int8_linear_is_close_and_row_invariant():
    torch.manual_seed(0)
    w, x = torch.randn(96, 64), torch.randn(9, 64, dtype=torch.bfloat16)
    lin = Int8Linear(w, None, torch.bfloat16)
    assert (lin.dequantized() - w).abs().max() <= w.abs().amax(1).max() / 127
    all_rows = lin.rows(x)
    for i in range(9):
        assert torch.equal(lin.rows(x[i : i + 1])[0], all_rows[i])


@pytest.mark.parametrize("kernel", ["fbgemm", "int_mm"])
def test_w8a8_linear_sums_exactly_and_is_row_invariant(kernel):
    torch.manual_seed(0)
    w, x = torch.randn(96, 64), torch.randn(9, 64, dtype=torch.bfloat16) * 3
    lin = W8A8Linear(w, torch.randn(96), torch.bfloat16)
    assert (lin.qweight is None) == (lin.fbgemm is not None)  # one int8 copy, not two
    assert torch.equal(lin.int8_weight(), int8_per_channel(w)[0])
    if kernel == "int_mm":
        lin.qweight, lin.fbgemm = lin.int8_weight(), None
    elif lin.fbgemm is None:
        pytest.skip("fbgemm sums exactly only with AVX-512 VNNI, which this CPU lacks (or no fbgemm in this torch)")
    all_rows = lin.rows(x)
    # the kernel's result is the exact integer sum, scaled: compare with float64
    xf = x.float()
    s = xf.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(xf / s).double()
    exact = (xq @ lin.int8_weight().double().T) * lin.scales.double() * s.double() + lin.bias.double()
    assert torch.allclose(all_rows.double(), exact, rtol=1e-2, atol=1e-2)  # bf16 output rounding
    assert (all_rows.float() - x.float() @ w.T - lin.bias.float()).abs().max() < 0.05 * exact.abs().max()
    for i in range(9):
        assert torch.equal(lin.rows(x[i : i + 1])[0], all_rows[i])
    for n in (2, 3, 4, 5, 8):  # no row padding: any number of rows
        assert torch.equal(lin.rows(x[:n]), all_rows[:n])


def test_fbgemm_is_used_exactly_where_the_cpu_has_vnni():
    # fbgemm's AVX2 path saturates int16 pair sums (CI failed on such a machine): it must not be chosen there
    lin = W8A8Linear(torch.randn(32, 64), None, torch.bfloat16)
    fbgemm_built = "fbgemm" in torch.backends.quantized.supported_engines
    assert (lin.fbgemm is not None) == (fbgemm_built and cpu_has_avx512_vnni())
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return
    assert cpu_has_avx512_vnni() == ("avx512_vnni" in flags and "avx512bw" in flags)


def test_int4_linear_is_close_and_row_invariant():
    torch.manual_seed(0)
    w, x = torch.randn(40, 64), torch.randn(9, 64, dtype=torch.bfloat16)  # 40 rows: padded to 48 inside
    lin = Int4Linear(w, torch.randn(40), torch.bfloat16)
    step = (w.reshape(40, 2, 32).amax(-1) - w.reshape(40, 2, 32).amin(-1)) / 15  # per group
    err = (lin.dequantized() - w).abs().reshape(40, 2, 32).amax(-1)
    assert (err <= step * 0.5 + 0.02).all()  # half a step, plus bf16 rounding of scale and offset
    all_rows = lin.rows(x)
    assert all_rows.shape == (9, 40)
    ref = x.float() @ lin.dequantized().T + lin.bias.float()
    assert (all_rows.float() - ref).abs().max() < 0.05 * ref.abs().max()
    for i in range(9):
        assert torch.equal(lin.rows(x[i : i + 1])[0], all_rows[i])


W4A8 = pytest.param("w4a8", marks=needs_w4a8())
W4A8_ALL = pytest.param("w4a8-all", marks=needs_w4a8())


@pytest.mark.parametrize("kind", [Int8Linear, W8A8Linear, Int4Linear, pytest.param(W4A8Linear, marks=needs_w4a8())])
def test_fused_projections_give_what_each_gives_alone(kind):
    torch.manual_seed(0)
    ws, x = [torch.randn(n, 64) for n in (48, 16, 16)], torch.randn(5, 64, dtype=torch.bfloat16)
    fused = kind(torch.cat(ws), None, torch.bfloat16).rows(x)
    alone = torch.cat([kind(w, None, torch.bfloat16).rows(x) for w in ws], -1)
    assert torch.equal(fused, alone)


def test_int4_refuses_shapes_it_cannot_group():
    with pytest.raises(ValueError, match="divisible"):
        Int4Linear(torch.randn(16, 40), None, torch.bfloat16)


@pytest.mark.parametrize("method", ["int8", "int8-all", "w8a8", "w8a8-all", "int4", "int4-all", W4A8, W4A8_ALL])
def test_quantized_model_tracks_the_original(method):
    model = tiny_model("qwen2", torch.bfloat16)
    q = quantize(copy.deepcopy(model), method)
    kind = {"int8": Int8Linear, "w8a8": W8A8Linear, "int4": Int4Linear, "w4a8": W4A8Linear}[method.split("-")[0]]
    assert q.quantization == method and isinstance(q.model.layers[0].mlp.gate_up_proj, kind)
    head = W8A8Linear if kind in (W8A8Linear, W4A8Linear) else Int8Linear
    assert isinstance(q.head_proj, head) == method.endswith("-all")
    ids = torch.randint(0, 260, (1, 40))
    a = model(ids, torch.arange(40)[None], model.new_cache(1, 64)).logits
    b = q(ids, torch.arange(40)[None], q.new_cache(1, 64)).logits
    # the quantized kernels compute what the original model computes with the rounded weights
    fake = copy.deepcopy(model)
    for layer, qlayer in zip(fake.model.layers, q.model.layers):
        for part, qpart in ((layer.self_attn, qlayer.self_attn), (layer.mlp, qlayer.mlp)):
            for fused, names in FUSED.items():
                if hasattr(qpart, fused):  # one matrix, the projections' weights one above the other
                    weights = getattr(qpart, fused).dequantized().split([getattr(part, n).out_features for n in names])
                    for name, w in zip(names, weights):
                        getattr(part, name).weight.data = w.to(torch.bfloat16)
            for name in ALONE:
                if hasattr(part, name):
                    getattr(part, name).weight.data = getattr(qpart, name).dequantized().to(torch.bfloat16)
    if q.head_proj is not None:
        fake.lm_head.weight.data = q.head_proj.dequantized().to(torch.bfloat16)
    c = fake(ids, torch.arange(40)[None], fake.new_cache(1, 64)).logits
    assert (b.float() - c.float()).norm() <= 0.05 * c.float().norm()
    if kind not in (Int4Linear, W4A8Linear):  # 4 bits on random weights move the logits too much for argmax agreement
        agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        assert agree >= 0.8, agree


@pytest.mark.parametrize("method", ["int8", "int8-all", "w8a8", "w8a8-all", "int4", W4A8, W4A8_ALL])
def test_greedy_speculation_is_exact_within_quantization(tokenizer, method):
    q = quantize(tiny_model("qwen2", torch.bfloat16, std=0.1), method)  # peaked: repetitive text
    prompts = ["abcabcabcabc", "one two one two one"]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = LLM.from_model(q, tokenizer, max_batch_size=2).generate(prompts, params)
    spec = LLM.from_model(q, tokenizer, max_batch_size=2,
                          speculative_config={"method": "ngram", "adaptive": False}).generate(prompts, params)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    assert sum(s.stats["accepted_tokens"] for s in spec) > 0
