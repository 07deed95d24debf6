"""Packed (oneDNN) projections: the plain model's numbers, weights recoverable, movable."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model
from draftwise.models.packed import PackedLinear, available, pack, plain_state_dict
from draftwise.models.quantize import quantize

pytestmark = pytest.mark.skipif(not available(torch.float32), reason="oneDNN is not available")


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, torch.arange(ids.shape[1])[None], model.new_cache(1, 64)).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_model_computes_what_the_plain_one_does(dtype):
    if not available(dtype):
        pytest.skip(f"oneDNN does not pack {dtype} here")
    model = tiny_model("qwen2", dtype)
    packed = pack(copy.deepcopy(model))
    assert isinstance(packed.model.layers[0].self_attn.qkv_proj, PackedLinear)
    assert isinstance(packed.model.layers[0].mlp.down_proj, PackedLinear)
    assert isinstance(packed.head_proj, PackedLinear)
    ids = torch.randint(0, 260, (1, 40))
    torch.testing.assert_close(logits(packed, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


def test_plain_state_dict_gives_back_the_weights():
    model = tiny_model("qwen2", torch.bfloat16)  # q/k/v biases: split again too
    want = {k: v for k, v in model.state_dict().items()}
    got = plain_state_dict(pack(copy.deepcopy(model)))
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_packed_model_can_change_dtype():
    model = tiny_model("llama", torch.float32)
    moved = pack(copy.deepcopy(model)).to(torch.bfloat16)
    direct = pack(copy.deepcopy(model).to(torch.bfloat16))
    assert moved.model.layers[1].mlp.gate_up_proj.packed.dtype == torch.bfloat16
    ids = torch.randint(0, 260, (1, 20))
    assert torch.equal(logits(moved, ids), logits(direct, ids))


def test_quantizing_a_packed_model_is_refused():
    with pytest.raises(ValueError, match="quantize the model as loaded"):
        quantize(pack(tiny_model("llama", torch.float32)), "int8")
