"""Attention of decode and verify passes on the CPU (`attention.c`).

Each query reads its row's committed cache slots in place and the new tokens its mask
allows, and sums them in one fixed order of its own, so its output never depends on the
other queries or rows of the pass, nor on whether its ancestors form a chain or a tree:
the property `models/attention.py` gets from padded torch operations, here in one C loop
per query (~4x faster than those operations at a 700-token context). `forward(...,
avx512=False)` runs the baseline build: the same operations in the same order, the same
bits (tests/test_kernels.py).
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from draftwise.kernels.build import KernelUnavailable, load

LANES = 16
MAX_HEAD_DIM = 256
MAX_GROUP = 16  # query heads per KV head


def library() -> ctypes.CDLL:
    """The built kernel, with its argument types declared; raises KernelUnavailable."""
    lib = load("attention")
    if not getattr(lib, "declared", False):
        p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        lib.attention_forward.argtypes = [p, i, p, p, i, i64, i, p, p, p, i, i, i, i, ctypes.c_float, p, i, i]
        lib.attention_forward.restype = i
        lib.attention_has_avx512.restype = i
        lib.declared = True
    return lib


@cache
def usable() -> bool:
    """Whether the kernel builds and loads here."""
    try:
        library()
    except KernelUnavailable:
        return False
    return True


@cache
def has_avx512() -> bool:
    return bool(library().attention_has_avx512())


def takes(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a model of these dimensions can run its attention here."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and head_dim % LANES == 0
            and head_dim <= MAX_HEAD_DIM and heads % kv_heads == 0 and heads // kv_heads <= MAX_GROUP and usable())


def forward(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor,
            sees: torch.Tensor, avx512: bool | None = None) -> torch.Tensor:
    """q `[b, heads, T, hd]`; keys/values one layer of the cache `[rows, kv_heads, capacity,
    hd]` (contiguous, the new tokens written at slots lengths + 0..T-1); rows `[b]` their
    cache rows; lengths `[b]` committed slots; sees `[b, T, T]` bool (new token i sees new
    token j) -> `[b, heads, T, hd]` in q's dtype."""
    b, heads, t, hd = q.shape
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    if keys.dtype != q.dtype or not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("attention kernel: keys and values must be contiguous and in q's dtype")
    q = q.contiguous()
    rows = rows.to(torch.int64).contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    sees = sees.to(torch.uint8).contiguous()
    out = torch.empty_like(q)
    use_avx512 = has_avx512() if avx512 is None else avx512 and has_avx512()
    if library().attention_forward(q.data_ptr(), q.dtype == torch.bfloat16, keys.data_ptr(), values.data_ptr(),
                                   keys.dtype == torch.bfloat16, capacity, kv_heads, rows.data_ptr(),
                                   lengths.data_ptr(), sees.data_ptr(), b, heads, t, hd, hd**-0.5, out.data_ptr(),
                                   use_avx512, torch.get_num_threads()):
        raise ValueError(f"attention kernel: shape not taken or no memory (q {tuple(q.shape)}, "
                         f"cache {tuple(keys.shape)}, lengths {lengths.tolist()})")
    return out
