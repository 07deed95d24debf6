"""Weight-only int8 quantization of the native model's projections.

Each projection's weight becomes int8 with one scale per output channel (symmetric,
round to nearest), and the matmul runs in `torch.ops.aten._weight_int8pack_mm`, which
reads half the bytes of bf16: decoding is bound by memory bandwidth, so it runs faster.
With `int8` the embeddings, norms and the LM head keep the model's dtype (the head decides
the argmax; keeping it exact keeps greedy agreement with the unquantized model high).
`int8-all` quantizes the LM head too (an int8 copy that the forward pass reads; the
original stays for embedding lookups and for draft heads that borrow it): on a large
vocabulary the head is a quarter of the bytes a decode step reads.

Quantization changes the model, so it is opt-in (`--quantization int8`) and named in
every report. Within one setting the lossless promise holds exactly as without it: the
int8 kernel gives each row the same result whatever the number of rows (checked in
tests/test_quantize.py), so greedy speculative output equals plain decoding.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZATIONS = ("none", "int8", "int8-all")


class Int8Linear(nn.Module):
    """y = x @ (int8 weight * per-channel scale).T + bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        w = weight.float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [out]
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)  # [out, in]
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x `[n, in]` -> `[n, out]`."""
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)
        else:  # no packed kernel assumed: dequantize on the fly
            y = x @ (self.qweight.to(x.dtype) * self.scales[:, None]).T
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize(model: nn.Module, method: str) -> nn.Module:
    """Replace the decoder layers' projections in place; returns the model."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}; choose one of: {', '.join(QUANTIZATIONS)}")
    if method == "none":
        return model
    dtype = model.dtype
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in PROJECTIONS:
                lin = getattr(parent, name, None)
                if isinstance(lin, nn.Linear):
                    setattr(parent, name, Int8Linear(lin.weight.data, lin.bias, dtype))
    if method == "int8-all":
        model.quantized_head = Int8Linear(model.head_weight.data, None, dtype)  # forward reads only this
    model.quantization = method
    return model
