"""4-bit weights times int8 activations on the CPU (`w4a8.c`): packing, and the matmul.

A weight `[out, in]` is cut into groups of 32 inputs; each group of each output channel
keeps 4-bit values 0..15 and its own fp16 scale and low end (w = scale * q + low, min to
max, as GGUF's Q4_K sub-blocks are), 5 bits per weight in all. Each group of 32 inputs
of a row is rounded to int8 with its own scale as it arrives (as llama.cpp's Q8_0
blocks are); the kernel sums the products of each group exactly in int32 (AVX-512 VNNI
where the CPU has it), then the groups in float in one fixed order, so a row's result is
the same whatever rows share the call. It reads the weights once per call for any number
of rows: a pass of the 1.5B over 2 tokens costs about one's, over 4 ~1.15x, over 8 ~1.5x
(integer work, not memory, bounds it from there), which is what speculation spends.

`matmul(..., vnni=False)` runs the portable C kernel: the same arithmetic in the same
order, bit for bit (tests/test_kernels.py), on any CPU with a C compiler.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from draftwise.kernels.build import KernelUnavailable, load
from draftwise.kernels.int4 import int4_groups

GROUP = 32
BLOCK = 16  # output channels per packed block


def library() -> ctypes.CDLL:
    """The built kernel, with its argument types declared; raises KernelUnavailable."""
    lib = load("w4a8")
    if not getattr(lib, "declared", False):
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.w4a8_linear.argtypes = [p, i, i, p, i, i, p, p, i, i, i]
        lib.w4a8_linear.restype = i
        lib.w4a8_has_vnni.restype = i
        lib.declared = True
    return lib


def available() -> str | None:
    """None if the kernel runs here, else why not."""
    try:
        library()
    except KernelUnavailable as e:
        return str(e)
    return None


@cache
def has_vnni() -> bool:
    return bool(library().w4a8_has_vnni())


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight `[out, in]` (in a multiple of 32) -> packed uint8 `[ceil(out/16), in/32, 320]`:
    per block of 16 channels and group of 32 inputs, 256 bytes of 4-bit values in the
    kernel's order, then 16 fp16 scales and 16 fp16 lows (layout in w4a8.c)."""

    w = weight.detach().float().cpu()
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"w4a8 needs input features ({k}) divisible by {GROUP}")
    w = torch.cat([w, w.new_zeros(-n % BLOCK, k)])
    blocks, groups = w.shape[0] // BLOCK, k // GROUP
    q, scale, low = int4_groups(w, GROUP, torch.float16, smallest=2**-14)  # fp16's smallest normal
    # input 32g + 8j + 4h + i of channel 16b + c -> block b, group g, byte 64j + 4c + i, nibble h
    q = q.reshape(blocks, BLOCK, groups, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)
    nibbles = (q[..., 0] | (q[..., 1] << 4)).reshape(blocks, groups, GROUP * BLOCK // 2)

    def per_block(t: torch.Tensor) -> torch.Tensor:  # [channels, groups] fp16 -> [blocks, groups, 32] bytes
        return t.reshape(blocks, BLOCK, groups).transpose(1, 2).contiguous().view(torch.uint8)

    return torch.cat([nibbles, per_block(scale), per_block(low)], -1).contiguous()


def unpack(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The float32 weight `[out, in]` a packed weight stands for."""
    blocks, groups, _ = packed.shape
    nibbles = packed[..., : GROUP * BLOCK // 2].reshape(blocks, groups, 4, BLOCK, 4)
    q = torch.stack([nibbles & 15, nibbles >> 4], -1)  # [b, g, j, c, i, h]
    q = q.permute(0, 3, 1, 2, 5, 4).reshape(blocks * BLOCK, groups, GROUP).float()

    def per_channel(t: torch.Tensor) -> torch.Tensor:  # [blocks, groups, 32] bytes -> [channels, groups]
        return t.contiguous().view(torch.float16).float().transpose(1, 2).reshape(blocks * BLOCK, groups)

    scale = per_channel(packed[..., GROUP * BLOCK // 2 : GROUP * BLOCK // 2 + 2 * BLOCK])
    low = per_channel(packed[..., GROUP * BLOCK // 2 + 2 * BLOCK :])
    return (q * scale[..., None] + low[..., None]).reshape(blocks * BLOCK, -1)[:out_features]


def matmul(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
           vnni: bool | None = None) -> torch.Tensor:
    """x `[rows, in]` (fp32 or bf16, CPU) -> `[rows, out]` in x's dtype; bias `[out rounded up to 16]` or None."""
    lib = library()
    if x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
        raise ValueError(f"the w4a8 kernel takes fp32 or bf16 on the CPU, not {x.dtype} on {x.device}")
    x = x.contiguous()
    m, k = x.shape
    blocks, groups, _ = packed.shape
    if groups * GROUP != k:
        raise ValueError(f"input has {k} features, the packed weight {groups * GROUP}")
    if bias is not None:
        bias = bias.float().contiguous()
        if bias.shape[0] != blocks * BLOCK:
            raise ValueError(f"bias has {bias.shape[0]} entries, the packed weight {blocks * BLOCK} channels")
    y = torch.empty(m, blocks * BLOCK, dtype=x.dtype)
    use_vnni = has_vnni() if vnni is None else vnni and has_vnni()
    if lib.w4a8_linear(packed.data_ptr(), blocks * BLOCK, k, x.data_ptr(), x.dtype == torch.bfloat16, m,
                       None if bias is None else bias.data_ptr(), y.data_ptr(), x.dtype == torch.bfloat16, use_vnni,
                       torch.get_num_threads()):
        raise MemoryError(f"w4a8: no memory for the int8 copy of {m} x {k} inputs")
    return y if y.shape[1] == out_features else y[:, :out_features]
