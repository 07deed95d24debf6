"""The C kernels (kernels/): w4a8's packing, its exact sums, row invariance, and its two
builds agreeing; attention's results, each query standing alone, and its two builds agreeing."""

from __future__ import annotations

import pytest
import torch

from conftest import needs_w4a8, tiny_model
from draftwise.kernels import attention, build, w4a8

pytestmark = needs_w4a8()


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What the kernel computes, in float64: each group of 32 inputs of a row rounded to int8
    with its own scale, times the weight."""
    xf = x.float().reshape(x.shape[0], -1, 32)
    top = xf.abs().amax(-1, keepdim=True)
    a = torch.round(xf * torch.where(top > 0, 127.0 / top, 0.0)).double() * (top.double() / 127)
    y = a.reshape(x.shape) @ weight.double().T
    return y if bias is None else y + bias.double()


def test_pack_keeps_weights_on_its_grid_exactly_and_others_within_half_a_step():
    torch.manual_seed(0)
    q = torch.randint(0, 16, (40, 64)).float()
    scale = torch.rand(40, 2).half().float() + 0.01
    low = torch.randn(40, 2).half().float()
    q[:, 0], q[:, 32], q[:, 1], q[:, 33] = 0, 0, 15, 15  # each group spans 0..15, so its scale is recovered
    on_grid = (q.reshape(40, 2, 32) * scale[..., None] + low[..., None]).reshape(40, 64)
    packed = w4a8.pack(on_grid)
    assert packed.shape == (3, 2, 320) and packed.dtype == torch.uint8  # 40 channels padded to 48
    assert torch.allclose(w4a8.unpack(packed, 40), on_grid, rtol=1e-3, atol=1e-3)  # fp16 scale of (max - min) / 15
    w = torch.randn(40, 64)
    step = (w.reshape(40, 2, 32).amax(-1) - w.reshape(40, 2, 32).amin(-1)) / 15
    err = (w4a8.unpack(w4a8.pack(w), 40) - w).abs().reshape(40, 2, 32).amax(-1)
    assert (err <= step * 0.5 + 2e-3).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_is_the_exact_group_sums_and_each_row_stands_alone(dtype):
    torch.manual_seed(0)
    w, bias = torch.randn(72, 96), torch.randn(72)
    packed = w4a8.pack(w)
    padded_bias = torch.cat([bias, bias.new_zeros(8)])
    x = (torch.randn(20, 96) * 3).to(dtype)  # 20 rows: the kernel's row tiles of 8, and a remainder
    y = w4a8.matmul(x, packed, 72, padded_bias)
    assert y.shape == (20, 72) and y.dtype == dtype
    ref = reference(x, w4a8.unpack(packed, 72), bias)
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # float sums over groups / bf16 output rounding
    assert torch.allclose(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    for n in (1, 2, 3, 7, 8, 9, 16):
        assert torch.equal(w4a8.matmul(x[:n], packed, 72, padded_bias), y[:n])
    for i in (0, 5, 13, 19):
        assert torch.equal(w4a8.matmul(x[i : i + 1], packed, 72, padded_bias)[0], y[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vector_and_portable_kernels_agree_bit_for_bit(dtype):
    if not w4a8.has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI: only the portable kernel runs")
    torch.manual_seed(1)
    packed = w4a8.pack(torch.randn(48, 320) * 0.1)
    x = torch.randn(11, 320).to(dtype)
    bias = torch.randn(48)
    assert torch.equal(w4a8.matmul(x, packed, 48, bias, vnni=True), w4a8.matmul(x, packed, 48, bias, vnni=False))


def test_bad_shapes_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="divisible by 32"):
        w4a8.pack(torch.randn(16, 40))
    packed = w4a8.pack(torch.randn(16, 64))
    with pytest.raises(ValueError, match="64"):
        w4a8.matmul(torch.randn(2, 32), packed, 16)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        w4a8.matmul(torch.randn(2, 64, dtype=torch.float16), packed, 16)


def test_a_missing_compiler_is_reported_not_raised_as_a_crash(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "no-such-compiler-here")
    monkeypatch.setenv("DRAFTWISE_CACHE", str(tmp_path))
    with pytest.raises(build.KernelUnavailable, match="no C compiler"):
        build.load.__wrapped__("w4a8")


def test_a_build_is_cached_by_source_and_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("DRAFTWISE_CACHE", str(tmp_path))
    lib = build.load.__wrapped__("w4a8")
    built = list((tmp_path / "kernels").glob("w4a8-*.so"))
    assert len(built) == 1 and lib.w4a8_has_vnni() in (0, 1)
    build.load.__wrapped__("w4a8")  # found, not rebuilt
    assert list((tmp_path / "kernels").glob("w4a8-*")) == built


def test_w4a8_refuses_a_weight_off_the_cpu():
    from draftwise.models.quantize import W4A8Linear

    with pytest.raises(ValueError, match="CPU kernel"):
        W4A8Linear(torch.empty(16, 32, device="meta"), None, torch.bfloat16)


def attention_reference(q, keys, values, rows, lengths, sees):
    """Softmax attention in float64: query i of batch row r reads slots 0..len-1 and the new
    tokens it sees (slot len + j)."""
    b, heads, t, hd = q.shape
    g = heads // keys.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for r in range(b):
        n = int(lengths[r])
        k = keys[rows[r], :, : n + t].double().repeat_interleave(g, 0)
        v = values[rows[r], :, : n + t].double().repeat_interleave(g, 0)
        visible = torch.ones(t, n + t, dtype=torch.bool)
        visible[:, n:] = sees[r]
        s = (q[r].double() @ k.transpose(-1, -2) * hd**-0.5).masked_fill(~visible, float("-inf"))
        out[r] = torch.softmax(s, -1) @ v
    return out


def random_cache(dtype, rows=3, kv_heads=2, capacity=832, hd=32):
    torch.manual_seed(0)
    return (torch.randn(rows, kv_heads, capacity, hd).to(dtype), torch.randn(rows, kv_heads, capacity, hd).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_softmax_and_each_query_stands_alone(dtype):
    keys, values = random_cache(dtype)
    t = 6
    q = torch.randn(2, 6, t, 32).to(dtype)
    rows, lengths = torch.tensor([2, 0]), torch.tensor([700, 37])  # batch rows read cache rows 2 and 0
    chain = torch.ones(t, t, dtype=torch.bool).tril().expand(2, t, t)
    out = attention.forward(q, keys, values, rows, lengths, chain)
    assert out.shape == q.shape and out.dtype == dtype
    ref = attention_reference(q, keys, values, rows, lengths, chain)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding
    assert torch.allclose(out.double(), ref, rtol=tol, atol=tol)
    for r in range(2):  # each query decoded alone, its chain committed before it
        for i in range(t):
            alone = attention.forward(q[r : r + 1, :, i : i + 1], keys, values, rows[r : r + 1],
                                      lengths[r : r + 1] + i, torch.ones(1, 1, 1, dtype=torch.bool))
            assert torch.equal(alone[0, :, 0], out[r, :, i])


def test_attention_of_a_tree_node_equals_its_path_as_a_chain():
    keys, values = random_cache(torch.bfloat16)
    parents = [-1, 0, 0, 1, 1, 2, 2, 3]
    t = len(parents)
    tree = torch.zeros(1, t, t, dtype=torch.bool)
    for i in range(t):
        j = i
        while j >= 0:
            tree[0, i, j], j = True, parents[j]
    q = torch.randn(1, 4, t, 32).bfloat16()
    out = attention.forward(q, keys, values, torch.tensor([1]), torch.tensor([300]), tree)
    ref = attention_reference(q, keys, values, torch.tensor([1]), torch.tensor([300]), tree)
    assert torch.allclose(out.double(), ref, rtol=1e-2, atol=1e-2)
    path = [0, 1, 3, 7]  # node 7's ancestors, written as a chain after the committed slots
    ck, cv = keys.clone(), values.clone()
    ck[1, :, 300:304], cv[1, :, 300:304] = keys[1, :, [300 + p for p in path]], values[1, :, [300 + p for p in path]]
    for depth, node in enumerate(path):
        alone = attention.forward(q[:, :, node : node + 1], ck, cv, torch.tensor([1]), torch.tensor([300 + depth]),
                                  torch.ones(1, 1, 1, dtype=torch.bool))
        assert torch.equal(alone[0, :, 0], out[0, :, node])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_builds_agree_bit_for_bit(dtype):
    if not attention.has_avx512():
        pytest.skip("this CPU has no AVX-512: only the baseline build runs")
    keys, values = random_cache(dtype, hd=64)
    q = torch.randn(3, 8, 5, 64).to(dtype)
    chain = torch.ones(5, 5, dtype=torch.bool).tril().expand(3, 5, 5)
    args = (q, keys, values, torch.tensor([0, 1, 2]), torch.tensor([3, 64, 500]), chain)
    assert torch.equal(attention.forward(*args, avx512=True), attention.forward(*args, avx512=False))


def test_attention_refuses_what_it_cannot_take():
    keys, values = random_cache(torch.float32, capacity=64)
    q = torch.randn(1, 4, 2, 32)
    with pytest.raises(ValueError, match="shape not taken"):  # 63 committed + 2 new slots > 64
        attention.forward(q, keys, values, torch.tensor([0]), torch.tensor([63]), torch.ones(1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="q's dtype"):
        attention.forward(q.bfloat16(), keys, values, torch.tensor([0]), torch.tensor([0]), torch.ones(1, 2, 2).bool())
    assert not attention.takes(4, 2, 24, torch.float32, torch.device("cpu"))  # head_dim not a multiple of 16
    assert not attention.takes(4, 2, 32, torch.float16, torch.device("cpu"))


def test_models_run_their_cpu_attention_in_the_kernel():
    """Where the kernels build (always in CI), the exactness tests' models take the C kernel."""
    assert tiny_model().attention_in_kernel() and tiny_model(hidden_size=96, num_attention_heads=6).attention_in_kernel()
