"""Prepacked weights for the CPU matmuls of the unquantized projections (oneDNN).

`F.linear` on CPU streams the plain row-major weight on every call. oneDNN's linear can
instead read a copy of the weight reordered once, at load, into the blocked layout its
kernel walks. Decoding is bound by how fast the weights stream, and the reordered copy
streams faster: measured on this 2-core AVX-512 machine over the projections of the
1.5B's 28 layers, bf16 57 ms against 84 ms per pass (1 row), fp32 99 against 239 ms
(`docs/results.md`). bf16 results are bit-identical to `F.linear`'s (fp32 ones are
summed in another order, ~1e-5 apart). Rows are padded to a multiple of 4 like every
matmul of the native model, so a row's result does not depend on how many rows share
the pass (tests/test_exactness.py checks packed models too).

`pack(model)` is the last step of loading a model onto the CPU: it swaps the decoder
layers' remaining `nn.Linear` projections (those quantization left; q/k/v and gate/up
fused as quantization fuses them) and gives the forward pass a packed copy of the LM
head (the original stays for embedding lookups and for draft heads that borrow it).
Where oneDNN is missing, or the dtype is one it does not pack, the model is left as it is.
A packed model can still be moved (`.to(dtype)`): its projections are unpacked, converted
and packed again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from draftwise.models.quantize import FUSED, replace_projections

PACKED_DTYPES = (torch.float32, torch.bfloat16)


def available(dtype: torch.dtype) -> bool:
    """Can oneDNN pack weights of this dtype on this CPU?"""
    if dtype not in PACKED_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear(nn.Module):
    """y = x @ weight.T + bias, with the weight held in oneDNN's blocked layout. Moved to a
    device or dtype oneDNN does not pack (`model.to(...)`), it holds the plain weight and
    runs `F.linear`."""

    pad_rows = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._hold(weight.detach().to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def _hold(self, weight: torch.Tensor) -> None:
        # an opaque oneDNN tensor is a plain attribute: a buffer would be saved with the model
        if weight.device.type == "cpu" and available(weight.dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
        else:
            self.packed = weight

    def weight(self) -> torch.Tensor:
        """The weight `[out, in]` in plain layout (a copy when packed)."""
        return self.packed.to_dense() if self.packed.is_mkldnn else self.packed

    def _apply(self, fn, recurse=True):  # .to(), .float(), ...: convert the plain weight, pack again
        super()._apply(fn, recurse)
        self._hold(fn(self.weight()))
        return self

    @property
    def packed_bytes(self) -> int:
        """Weight bytes held outside the module's buffers."""
        return self.packed.numel() * self.packed.element_size()

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x `[n, in]` -> `[n, out]`."""
        if self.packed.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")
        return F.linear(x, self.packed, self.bias)


def pack(model: nn.Module) -> nn.Module:
    """Pack the unquantized projections and the LM head of a CPU model in place; returns it."""
    if model.device.type != "cpu" or not available(model.dtype):
        return model
    replace_projections(model, PackedLinear)
    if model.head_proj is None:
        model.head_proj = PackedLinear(model.head_weight.data, None, model.dtype)
    return model


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each packed projection back in plain layout under its
    Hugging Face name (fused q/k/v and gate/up split again): what transformers expects.
    Unpacking copies the weights (oneDNN's reorder back to plain layout, exact)."""
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if not isinstance(module, PackedLinear) or name == "head_proj":
            continue
        state.pop(f"{name}.bias", None)
        parent, attr = name.rsplit(".", 1)
        names = FUSED.get(attr, (attr,))
        # the sizes the forward pass splits by: q/k/v as the attention says, gate/up in halves
        split = model.get_submodule(parent).qkv_sizes if attr == "qkv_proj" else module.out_features // len(names)
        biases = [None] * len(names) if module.bias is None else module.bias.split(split)
        for sub, w, b in zip(names, module.weight().split(split), biases):
            state[f"{parent}.{sub}.weight"] = w
            if b is not None:
                state[f"{parent}.{sub}.bias"] = b
    return {k: v for k, v in state.items() if not k.startswith("head_proj.")}
