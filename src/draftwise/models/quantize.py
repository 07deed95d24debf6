"""Quantization of the native model's projections: int8 weights (with or without int8
activations) and int4 weights.

- `int8`: each projection's weight becomes int8 with one scale per output channel
  (symmetric, round to nearest); the matmul runs in `torch.ops.aten._weight_int8pack_mm`,
  which reads half the bytes of bf16. Decoding is bound by memory bandwidth, so it runs
  faster. Its cost grows with the rows of a pass (8 rows: about 2x one row).
- `w8a8`: the same int8 weights, and each input row quantized to int8 with its own scale
  when it arrives; the products are summed exactly in int32 by fbgemm's int8 kernel where
  the CPU has AVX-512 VNNI, which reads the weights once for up to 8-16 rows, so a pass
  verifying 8 tokens costs little more than one. Without VNNI (AVX2, or AVX-512 before
  VNNI) fbgemm adds pairs of byte products in int16 with saturation, which is not exact, so
  those CPUs take `torch._int_mm` (the same int32 sums, slower). Rounding the activations costs a little accuracy (measured
  by `draftwise bench --quality`).
- `int4`: 4-bit weights in groups of `INT4_GROUP` input channels, each group with its own
  scale and offset (asymmetric, min to max); the matmul runs in
  `torch.ops.aten._weight_int4pack_mm_for_cpu`, a quarter of the bytes of bf16 plus the
  scales. Groups of 32 match the sub-blocks of GGUF's Q4_K, so a model read from a
  Q4_K_M file is requantized almost without loss.
- `w4a8`: the same 4-bit groups (fp16 scale and low per group of 32 inputs), and each
  group of 32 inputs of a row rounded to int8 with its own scale; draftwise's own kernel
  (`kernels/w4a8.c`, AVX-512 VNNI, built with the system C compiler on first use) sums
  each group exactly in int32 and reads the weights once for any number of rows: the
  fewest bytes per pass of these settings, and a pass over 2 tokens costs about one's.
- The embeddings, norms and the LM head keep the model's dtype (the head decides the
  argmax; keeping it exact keeps greedy agreement with the unquantized model high).
  The `-all` settings also give the forward pass an int8 copy of the LM head (int8 with
  int8 activations for `w8a8-all` and `w4a8-all`; the original stays for embedding
  lookups and for draft heads that borrow it): on a large vocabulary the head is a
  quarter of the bytes a bf16 decode step reads.

Quantization changes the model, so it is opt-in (`--quantization int8`) and named in
every report. Within one setting the lossless promise holds exactly as without it: each
kernel gives each row the same result whatever the number of rows (integer sums are
exact; checked in tests/test_quantize.py), so greedy speculative output equals plain
decoding.
"""

from __future__ import annotations

import warnings
from functools import cache

import torch
from torch import nn

from draftwise.kernels import w4a8
from draftwise.kernels.build import KernelUnavailable
from draftwise.kernels.int4 import int4_groups  # noqa: F401 (used by Int4Linear; w4a8 shares it)

QUANTIZATIONS = ("none", "int8", "int8-all", "w8a8", "w8a8-all", "int4", "int4-all", "w4a8", "w4a8-all")
INT4_GROUP = 32


def int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight `[out, in]`, float32 scale per output channel): symmetric, round to nearest."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    """y = x @ (int8 weight * per-channel scale).T + bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        q, scales = int8_per_channel(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.in_features, self.out_features = q.shape[1], q.shape[0]

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x `[n, in]` -> `[n, out]`."""
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)
        else:  # no packed kernel assumed: dequantize on the fly
            y = x @ (self.qweight.to(x.dtype) * self.scales[:, None]).T
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]


class W8A8Linear(nn.Module):
    """y = (x quantized to int8 per row) @ (int8 weight).T * scales + bias, summed exactly in int32."""

    pad_rows = False  # integer sums are exact: a row's result never depends on the other rows

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        q, scales = int8_per_channel(weight)
        self.fbgemm = FbgemmInt8(q, scales) if weight.device.type == "cpu" and FbgemmInt8.available() else None
        self.register_buffer("qweight", q if self.fbgemm is None else None)  # fbgemm keeps its own packed copy
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.in_features, self.out_features = q.shape[1], q.shape[0]

    @property
    def packed_bytes(self) -> int:
        """Weight bytes held outside the module's buffers (fbgemm's packed copy)."""
        return 0 if self.fbgemm is None else self.out_features * self.in_features

    def int8_weight(self) -> torch.Tensor:
        """The int8 weight `[out, in]`."""
        return self.qweight if self.fbgemm is None else self.fbgemm.unpacked()[:, : self.in_features]

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x `[n, in]` -> `[n, out]`."""
        xf = x.float()
        top = xf.abs().amax(-1, keepdim=True).clamp_(min=1e-12)  # each row's own scale: top / 127
        xq = torch.round(xf * (127.0 / top))  # integers in [-127, 127], as float
        s = top / 127.0
        if self.fbgemm is not None and x.device.type == "cpu":
            y = self.fbgemm(xq)  # = (xq @ qweight.T) * scales
        elif x.device.type == "cpu":  # no fbgemm: the same exact int32 sums, slower
            y = torch._int_mm(xq.to(torch.int8), self.qweight.T).float() * self.scales
        else:  # no int8 kernel assumed
            y = (xq @ self.qweight.float().T) * self.scales
        y = (y * s).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        return self.int8_weight().float() * self.scales[:, None]


@cache
def cpu_has_avx512_vnni() -> bool:
    """Whether this CPU has AVX-512 VNNI: asked of the CPU by the built w4a8 kernel, or read
    from /proc/cpuinfo where no kernel can be built (no C compiler); False where neither tells."""
    try:
        return w4a8.has_vnni()
    except KernelUnavailable:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return all(flag in flags for flag in ("avx512f", "avx512bw", "avx512_vnni"))


class FbgemmInt8:
    """fbgemm's dynamic int8 linear (VNNI on x86) used as an exact int8 x int8 -> int32 product.

    The kernel quantizes its whole input with one scale and offset taken from the input's
    min and max. Two extra input columns, with zero weights, hold -128 and 127 in the first
    row: that makes the scale exactly 1 and the offset 128, so integer-valued inputs in
    [-127, 127] pass through unchanged, the products are summed in int32, and each row's
    result depends on nothing but that row."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        q = torch.cat([q, q.new_zeros(q.shape[0], 2)], 1)
        with warnings.catch_warnings():  # quantized tensors are deprecated; the kernel has no successor yet
            warnings.simplefilter("ignore")
            zero = torch.zeros_like(scales, dtype=torch.long)
            self.packed = torch.ops.quantized.linear_prepack(
                torch._make_per_channel_quantized_tensor(q, scales.double(), zero, 0), None)
        self.pins = torch.zeros(0, 2)

    @staticmethod
    def available() -> bool:
        """fbgemm is built in and sums exactly here: only with AVX-512 VNNI (vpdpbusd adds each
        four byte products into int32). Its AVX2 path adds pairs of u8 x s8 products in int16
        with saturation (255 * 127 * 2 > 32767), so large activations would come out wrong."""
        return "fbgemm" in torch.backends.quantized.supported_engines and cpu_has_avx512_vnni()

    def unpacked(self) -> torch.Tensor:
        """The packed int8 weight `[out, in + 2]`, back in plain layout."""
        return torch.ops.quantized.linear_unpack(self.packed)[0].int_repr()

    def __call__(self, xq: torch.Tensor) -> torch.Tensor:
        """xq `[n, in]` (float, integer values in [-127, 127]) -> (xq @ q.T) * scales `[n, out]`, float32."""
        n = xq.shape[0]
        if self.pins.shape[0] < n:
            self.pins = torch.zeros(max(n, 64), 2)
            self.pins[0, 0], self.pins[0, 1] = -128, 127
        return torch.ops.quantized.linear_dynamic(torch.cat([xq, self.pins[:n]], 1), self.packed, False)


class Int4Linear(nn.Module):
    """y = x @ dequant(4-bit weight).T + bias, dequant = (q - 8) * scale + zero per group."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 group: int = INT4_GROUP) -> None:
        super().__init__()
        w = weight.float()
        out_features, k = w.shape
        if k % group:
            raise ValueError(f"int4 needs input features ({k}) divisible by the group size {group}")
        w = torch.cat([w, w.new_zeros(-out_features % 16, k)])  # the packed kernel wants rows in 16s
        n = w.shape[0]
        q, scale, low = int4_groups(w, group)  # scale, low [n, groups]
        q = q.to(torch.int32).reshape(n, k)
        zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(dtype))
        self.packed_cpu = weight.device.type == "cpu"
        if self.packed_cpu:
            self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _inner_k_tiles(k)))
        else:  # no packed kernel assumed: keep the 4-bit values and dequantize on the fly
            self.register_buffer("qweight", q.to(torch.uint8))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.in_features, self.out_features, self.group = k, out_features, group

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x `[n, in]` -> `[n, out]`."""
        if self.packed_cpu and x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.group, self.scales_and_zeros)
            y = y if y.shape[1] == self.out_features else y[:, : self.out_features]
        else:
            y = x @ self.dequantized().to(x.dtype).T
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        if self.packed_cpu:  # recover the 4-bit values by multiplying with the identity
            eye = torch.eye(self.in_features, dtype=self.scales_and_zeros.dtype)
            ones = self.scales_and_zeros.new_zeros(self.scales_and_zeros.shape)
            ones[..., 0] = 1  # scale 1, zero 0: the kernel returns q - 8
            q = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group, ones).T.float() + 8
        else:
            q = self.qweight.float()
        sz = self.scales_and_zeros.float().transpose(0, 1)  # [n, groups, 2]
        q = q.reshape(sz.shape[0], -1, self.group)
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(sz.shape[0], -1)[: self.out_features]


class W4A8Linear(nn.Module):
    """y = (x rounded to int8 per group of 32 inputs) @ (4-bit weight in groups of 32).T +
    bias, each group summed exactly in int32 (kernels/w4a8.py)."""

    pad_rows = False  # the kernel gives each row the same result whatever rows share the call

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        if weight.device.type != "cpu":
            raise ValueError("w4a8 is a CPU kernel; on a GPU use --quantization none")
        if (why := w4a8.available()) is not None:
            raise ValueError(f"w4a8 is unavailable here ({why}); use --quantization w8a8 instead")
        self.register_buffer("qweight", w4a8.pack(weight))
        padded = self.qweight.shape[0] * w4a8.BLOCK
        self.register_buffer("bias", None if bias is None else torch.cat(
            [bias.detach().float(), bias.new_zeros(padded - bias.shape[0], dtype=torch.float32)]))
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x `[n, in]` -> `[n, out]`."""
        dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
        return w4a8.matmul(x.to(dtype), self.qweight, self.out_features, self.bias).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        return w4a8.unpack(self.qweight, self.out_features)


def _inner_k_tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # same input
ALONE = ("o_proj", "down_proj")


def quantize(model: nn.Module, method: str) -> nn.Module:
    """Replace the decoder layers' projections in place; returns the model. Projections
    that read the same input are fused into one matrix (fewer, larger kernel calls; the
    per-output-channel scales make each output the same as unfused)."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}; choose one of: {', '.join(QUANTIZATIONS)}")
    if method == "none":
        return model
    if model.head_proj is not None:
        raise ValueError("this model's projections are already quantized or packed; quantize the model as loaded")
    kinds = {"int8": Int8Linear, "w8a8": W8A8Linear, "int4": Int4Linear, "w4a8": W4A8Linear}
    kind = kinds[method.removesuffix("-all")]
    replace_projections(model, kind)
    if method.endswith("-all"):
        head = W8A8Linear if kind in (W8A8Linear, W4A8Linear) else Int8Linear
        model.head_proj = head(model.head_weight.data, None, model.dtype)  # forward reads only this
    model.quantization = method
    return model


def replace_projections(model: nn.Module, make) -> None:
    """Swap each decoder layer's remaining `nn.Linear` projections for `make(weight, bias,
    dtype)` (a module with `rows`), fusing q/k/v and gate/up into one matrix each."""
    dtype = model.dtype
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for fused, names in FUSED.items():
                if all(isinstance(getattr(parent, name, None), nn.Linear) for name in names):
                    setattr(parent, fused, make(*_stacked([getattr(parent, name) for name in names]), dtype))
                    for name in names:
                        delattr(parent, name)
            for name in ALONE:
                lin = getattr(parent, name, None)
                if isinstance(lin, nn.Linear):
                    setattr(parent, name, make(lin.weight.data, lin.bias, dtype))


def _stacked(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights of projections reading the same input, one above the other, and their biases."""
    weight = torch.cat([lin.weight.data for lin in linears])
    if all(lin.bias is None for lin in linears):
        return weight, None
    return weight, torch.cat([lin.weight.new_zeros(lin.out_features) if lin.bias is None else lin.bias.data
                              for lin in linears])
