"""Attention whose numbers do not depend on the pass a query runs in, in torch operations.

On the CPU, decode and verify passes run the C kernel `kernels/attention.c` instead (the
same property, another summation order, ~4x faster); this recipe serves CUDA, and the
CPU where the kernel does not build.

Greedy speculation is lossless only if a token's logits are bit-identical whether it is
decoded alone, verified in a chain, verified as a node of a tree, or run beside other rows.
Floating-point sums depend on their order (a long fp32 matmul does not even give the same
result when zero terms are inserted), so the attention of a query at position p follows one
fixed recipe over the absolute key positions 0..p:

- scores are fp32 dot products over the head dimension (the same whatever the matmul's
  shape or the key's column), the softmax max is exact, the weights are exp(s - max);
- keys are cut into blocks of BLOCK absolute positions; each block's weight sum and
  weighted value sum is one small reduction / matmul; the rows of these matmuls (the
  query heads sharing a KV head, times the queries) are padded to a multiple of 4 (CPU
  kernels then give each row the same result whatever the row count; only 1-3 rows
  differ, measured on AVX-512);
- the block results are added in position order, one after the other (`cumsum`); masked
  blocks add exact zeros, which change nothing.

Decoding and chain verification keep every key at the column of its position, so all
queries of a row read the cache in place. A tree pass writes its nodes to scratch slots in
tree order, so a node's ancestors are not at the columns of their positions. There the keys
of a row are read in two parts: the prefix [0, A) with A = committed length rounded down to
BLOCK, in place; and the tail from A on, gathered per query in position order (committed
slots, then the query's root-to-node path). Either way each query sums the same numbers in
the same order as when it is decoded alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from draftwise.cache import BLOCK  # noqa: F401 (the key block, defined with the cache that holds whole blocks)

ROW_MULTIPLE = 4


def padded_rows(n: int) -> int:
    return -(-n // ROW_MULTIPLE) * ROW_MULTIPLE


@dataclass
class KeyLayout:
    """Which cache slots each query reads, shared by all layers of one pass."""

    bias: torch.Tensor  # [b, 1, n, 1, T, BLOCK] fp32, 0 or -inf: key column n*BLOCK+j read in place
    tail_slots: torch.Tensor | None  # [b, T, W] long: the slot of tail column j (trees only)
    tail_bias: torch.Tensor | None  # [b, 1, 1, T, W] fp32, 0 or -inf


def key_layout(lengths: torch.Tensor, attend: torch.Tensor, key_len: int, width: int | None = None) -> KeyLayout:
    """lengths [b] committed slots per row; attend [b, T, T] bool: new token i sees new
    token j (a causal chain, or a tree whose parents come before their children); key_len:
    a multiple of BLOCK past every new slot; width: the tree tail's columns (default: the
    fewest whole blocks that hold it; a fixed one keeps the pass's shapes fixed)."""
    b, t, _ = attend.shape
    device = attend.device
    seen = attend.sum(-1)  # [b, T] new tokens on the query's path, itself included
    cols = torch.arange(key_len, device=device)
    in_order = torch.arange(t, device=device) < seen[..., None]  # path is new tokens 0..seen-1
    if torch.equal(attend, in_order):  # plain decoding and chains: every key at its position
        return KeyLayout(_bias(cols < (lengths[:, None] + seen)[..., None]), None, None)
    starts = lengths // BLOCK * BLOCK  # [b] A
    width = width or -(-int((lengths - starts).max() + t) // BLOCK) * BLOCK
    path = torch.argsort((~attend).to(torch.int8), dim=-1, stable=True)  # path nodes first, in order
    col = starts[:, None, None] + torch.arange(width, device=device)  # [b, 1, W] absolute column
    rel = col - lengths[:, None, None]  # position among the new tokens
    node = torch.gather(path, 2, rel.clamp(0, t - 1).expand(b, t, width))
    slots = torch.where(rel < 0, col, lengths[:, None, None] + node)
    ok = rel < seen[..., None]
    prefix = _bias((cols < starts[:, None])[:, None].expand(b, t, key_len))
    tail_bias = torch.zeros(ok.shape, device=device).masked_fill(~ok, float("-inf"))
    return KeyLayout(prefix, torch.where(ok, slots, 0), tail_bias[:, None, None])


def _bias(visible: torch.Tensor) -> torch.Tensor:
    """[b, T, S] bool -> additive fp32 bias [b, 1, n, 1, T, BLOCK] (block-major keys)."""
    b, t, s = visible.shape
    bias = torch.zeros(visible.shape, device=visible.device).masked_fill(~visible, float("-inf"))
    return bias.view(b, t, s // BLOCK, BLOCK).transpose(1, 2).contiguous()[:, None, :, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: KeyLayout) -> torch.Tensor:
    """q `[b, heads, T, hd]`, k/v `[b, kv_heads, S, hd]` (the rows' cache with the new
    tokens written, S = key_len) -> `[b, heads, T, hd]`. Query heads sharing a KV head are
    stacked into one matmul per key block (GQA without copying keys), their g*T rows
    padded with zero rows to a multiple of ROW_MULTIPLE."""
    b, h, t, hd = q.shape
    kvh, s = k.shape[1], k.shape[2]
    g, n = h // kvh, s // BLOCK
    rows, m = g * t, padded_rows(g * t)
    qf = (q.float() * hd**-0.5).reshape(b, kvh, 1, rows, hd)
    if m > rows:
        qf = torch.cat([qf, qf.new_zeros(b, kvh, 1, m - rows, hd)], dim=3)
    scores = qf @ k.float().view(b, kvh, n, BLOCK, hd).transpose(-1, -2)  # [b, kvh, n, m, BLOCK]
    scores = (scores if m == rows else scores[:, :, :, :rows]).reshape(b, kvh, n, g, t, BLOCK)
    if layout.tail_slots is not None:
        flat = scores.permute(0, 1, 3, 4, 2, 5).reshape(b, kvh, g, t, s)
        tail = torch.gather(flat, 4, layout.tail_slots[:, None, None].expand(b, kvh, g, t, -1))
        tail.add_(layout.tail_bias)  # [b, kvh, g, T, W]
    scores.add_(layout.bias)
    top = scores.amax(dim=(2, 5), keepdim=True)  # [b, kvh, 1, g, T, 1]
    if layout.tail_slots is not None:
        top = torch.maximum(top, tail.amax(-1, keepdim=True)[:, :, None])
    vf = v.float()
    e = scores.sub_(top).exp_()
    den = e.sum(-1)  # [b, kvh, n, g, T]
    e = e.view(b, kvh, n, rows, BLOCK)
    if m > rows:
        e = torch.cat([e, e.new_zeros(b, kvh, n, m - rows, BLOCK)], dim=3)
    num = (e @ vf.view(b, kvh, n, BLOCK, hd))[:, :, :, :rows]  # [b, kvh, n, g*T, hd]
    if layout.tail_slots is not None:
        batch = torch.arange(b, device=q.device)[:, None, None]
        vt = vf[batch, :, layout.tail_slots].permute(0, 3, 1, 2, 4)  # [b, kvh, T, W, hd]
        tnum, tden = _tail_blocks(tail.sub_(top[:, :, 0]).exp_(), vt)
        num = torch.cat([num, tnum.reshape(b, kvh, -1, rows, hd)], dim=2)
        den = torch.cat([den, tden], dim=2)
    num = num.cumsum(2)[:, :, -1].view(b, kvh, g, t, hd)  # blocks added in position order
    den = den.cumsum(2)[:, :, -1, :, :, None]
    return (num / den).reshape(b, h, t, hd).to(v.dtype)


def _tail_blocks(e: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tail key blocks, gathered per query: e [b, kvh, g, T, W] weights, v [b, kvh, T, W,
    hd] -> weighted sums [b, kvh, n, g, T, hd] and weight sums [b, kvh, n, g, T]. The g
    heads of a query are padded to ROW_MULTIPLE rows, so each row rounds as in-place blocks do."""
    b, kvh, g, t, w = e.shape
    n, hd, gp = w // BLOCK, v.shape[-1], padded_rows(g)
    blocks = e.reshape(b, kvh, g, t, n, BLOCK)
    den = blocks.sum(-1).permute(0, 1, 4, 2, 3)
    x = blocks.permute(0, 1, 3, 4, 2, 5)  # [b, kvh, T, n, g, BLOCK]
    if gp > g:
        x = torch.cat([x, x.new_zeros(b, kvh, t, n, gp - g, BLOCK)], dim=4)
    num = (x @ v.reshape(b, kvh, t, n, BLOCK, hd))[:, :, :, :, :g]  # [b, kvh, T, n, g, hd]
    return num.permute(0, 1, 3, 4, 2, 5), den
