"""The native decoder: one readable file for the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM2).

Notable features:
- `forward(ids, positions, cache, tree_mask=...)` takes explicit positions and an
  attention mask over the new tokens, so a plain step, a chain verification, a tree
  verification and a batched step are the same call.
- New keys/values go to the slots after each row's committed length (`KVCache`); the
  caller commits by setting lengths, so rollback is free.
- Logits only for the positions asked for (`logits_at`), and hidden states of chosen
  layers for speculation heads.
- Batch invariance: CPU matrix kernels pick a different reduction order for very few
  rows (measured on AVX-512: fp32 for 1, 2-3 and the tail rows of M % 4 != 0 below 12;
  bf16 for M = 1), so a token's logits would depend on how many tokens share its pass.
  Every matmul pads its rows to a multiple of 4, and attention follows one fixed recipe
  per query (on the CPU the C kernel `kernels/attention.c`, else `attention.py`), so
  decoding one token, verifying eight in a chain or a tree, and running beside other rows
  give bit-identical results per token. That is what makes greedy speculation exact
  (tests/test_exactness.py keeps it true).
- Static shapes on CUDA: there the library kernels choose their reduction order from the
  whole shape (measured on an H200: fp32 matmuls for 1 row against more, the norms' mean
  for 4-15 rows, batched matmuls for their batch count), so padding rows is not enough.
  Every pass over at most BLOCK tokens runs at one shape instead: all cache rows,
  BLOCK tokens each, keys over the whole cache (`Transformer.static_shapes`).
- Attention has three paths, chosen once per pass by `plan_attention` (a tagged plan the
  layers carry out): the C kernel for decode / verify passes on the CPU, a blocked torch
  recipe for those elsewhere, fused SDPA for long prefills.

Parameter names are Hugging Face's, so HF checkpoints load without renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from draftwise.cache import BLOCK, KVCache
from draftwise.kernels import attention as attention_kernel
from draftwise.models.attention import ROW_MULTIPLE, KeyLayout, attention, key_layout, padded_rows
from draftwise.models.config import ModelConfig

# BLOCK (64, from the cache): key lengths and cache capacities are whole blocks, a cache
# keeps one block of spare slots past its capacity, and a static-shape pass (CUDA) runs
# BLOCK tokens per row.
SDPA_FROM = 128  # passes over more tokens than this (prefill) use the fused SDPA kernel


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [batch, n, vocab] for the positions in logits_at (all if None)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [batch, T, hidden]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def on_padded_rows(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`fn` applied to x's rows `[n, in] -> [n, out]`, with n padded to a multiple of
    ROW_MULTIPLE, so each row's result does not depend on how many rows there are."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    n = flat.shape[0]
    if n % ROW_MULTIPLE:
        flat = torch.cat([flat, flat.new_zeros(padded_rows(n) - n, shape[-1])])
    out = fn(flat)[:n]
    return out.reshape(*shape[:-1], out.shape[-1])


def padded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if weight.dtype == torch.float32 and weight.device.type == "cpu":
        # MKL's fp32 GEMM on Intel CPUs picks its kernel, and with it the order of the sums,
        # by the number of rows (measured on a Xeon: 4 and 8 rows agree, 16 do not), so each
        # call gets exactly ROW_MULTIPLE rows. Loaded CPU models use oneDNN's packed weights
        # (models/packed.py), which do not need this; it serves unpacked fp32 models.
        return on_padded_rows(x, lambda rows: torch.cat([F.linear(c, weight, bias)
                                                         for c in rows.split(ROW_MULTIPLE)]))
    return on_padded_rows(x, lambda rows: F.linear(rows, weight, bias))


def proj(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A projection: nn.Linear, or a module with `rows(x)` (quantized: models/quantize.py;
    packed: models/packed.py); rows are padded unless the module says its rows never
    depend on each other."""
    if isinstance(layer, nn.Linear):
        return padded_linear(x, layer.weight, layer.bias)
    if getattr(layer, "pad_rows", True):
        return on_padded_rows(x, layer.rows)
    out = layer.rows(x.reshape(-1, x.shape[-1]))
    return out.reshape(*x.shape[:-1], out.shape[-1])


# --- rotary embeddings ----------------------------------------------------------------


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies `[head_dim/2]`, with linear or Llama-3 scaling applied."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old_ctx = sc.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope scaling {kind!r} (supported: linear, llama3)")
    return inv.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[batch, heads, T, head_dim]`, cos/sin `[batch, 1, T, head_dim]` (half-split layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# --- layers ---------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.heads * hd, cfg.hidden_size, bias=False)
        # q, k and v in one matrix (fused by models/quantize.py and models/packed.py), split by these sizes
        self.qkv_proj: nn.Module | None = None
        self.qkv_sizes = [self.heads * hd, self.kv_heads * hd, self.kv_heads * hd]
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x: torch.Tensor, step: "StepInputs") -> torch.Tensor:
        b, t, _ = x.shape
        if self.qkv_proj is None:
            q, k, v = proj(self.q_proj, x), proj(self.k_proj, x), proj(self.v_proj, x)
        else:
            q, k, v = proj(self.qkv_proj, x).split(self.qkv_sizes, -1)
        q = q.reshape(b, t, self.heads, self.head_dim)
        k = k.reshape(b, t, self.kv_heads, self.head_dim)
        v = v.reshape(b, t, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, t, hd]
        q, k = apply_rope(q, step.cos, step.sin), apply_rope(k, step.cos, step.sin)
        step.cache.write(self.index, k, v, step.slots, step.rows)
        plan = step.plan
        if isinstance(plan, KernelAttention):  # the C kernel reads the whole cache in place
            keys, values = step.cache.layer(self.index, step.cache.capacity)
            out = attention_kernel.forward(q, keys, values, plan.cache_rows, plan.lengths, plan.sees)
        else:
            keys, values = step.cache.layer(self.index, step.key_len)  # [b, kv_heads, S, hd]
            keys, values = (keys[:b], values[:b]) if step.rows is None else (keys[step.rows], values[step.rows])
            if isinstance(plan, SdpaAttention):
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=plan.mask, enable_gqa=True)
            else:
                out = attention(q, keys, values, plan.layout)
        out = out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return proj(self.o_proj, out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one matrix (fused like qkv_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = proj(self.gate_proj, x), proj(self.up_proj, x)
        else:
            gate, up = proj(self.gate_up_proj, x).chunk(2, -1)
        return proj(self.down_proj, F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, index)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, step: "StepInputs") -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), step)
        return x + self.mlp(self.post_attention_layernorm(x))


# --- one pass's shared inputs, and its attention plan ------------------------------------


@dataclass(frozen=True)
class KernelAttention:
    """Decode / verify passes on the CPU: the C kernel (kernels/attention.py) reads the cache in place."""

    sees: torch.Tensor  # [batch, T, T] uint8: new token i sees new token j
    lengths: torch.Tensor  # [batch] committed slots
    cache_rows: torch.Tensor  # [batch] cache rows (`rows`, or 0..batch-1)


@dataclass(frozen=True)
class BlockedAttention:
    """Decode / verify passes elsewhere: the blocked torch recipe of models/attention.py."""

    layout: KeyLayout


@dataclass(frozen=True)
class SdpaAttention:
    """Passes over more than SDPA_FROM tokens (long prefills): the fused kernel, memory-lean."""

    mask: torch.Tensor  # [batch, 1, T, key_len] bool


AttentionPlan = KernelAttention | BlockedAttention | SdpaAttention


@dataclass(frozen=True)
class StepInputs:
    """What every layer of one forward pass shares."""

    cache: KVCache
    slots: torch.Tensor  # [batch, T] cache slots the new tokens are written to
    rows: torch.Tensor | None  # [batch] cache rows of the batch, None = all rows in order
    key_len: int  # keys read per row (whole blocks)
    cos: torch.Tensor  # [batch, 1, T, head_dim]
    sin: torch.Tensor
    plan: AttentionPlan


def plan_attention(*, lengths: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor | None, key_len: int,
                   tree_mask: torch.Tensor, kernel: bool, static: bool) -> AttentionPlan:
    """The attention path of a pass, chosen here and nowhere else: SDPA for more than
    SDPA_FROM tokens, else the C kernel when the model runs there (`kernel`), else the
    blocked recipe (with a fixed tree tail at static shapes)."""
    b, t = slots.shape
    if t > SDPA_FROM:
        return SdpaAttention(mask=build_mask(lengths, slots, key_len, tree_mask))
    if kernel:
        cache_rows = torch.arange(b, device=slots.device) if rows is None else rows
        return KernelAttention(sees=tree_mask.to(torch.uint8).contiguous(), lengths=lengths.contiguous(),
                               cache_rows=cache_rows.contiguous())
    return BlockedAttention(layout=key_layout(lengths, tree_mask, key_len, 2 * BLOCK if static else None))


def step_inputs(
    inv_freq: torch.Tensor, positions: torch.Tensor, cache: KVCache, lengths: torch.Tensor,
    rows: torch.Tensor | None, tree_mask: torch.Tensor | None = None, static: bool = False, kernel: bool = False,
) -> StepInputs:
    """What the layers of one pass share: new tokens go to slots `lengths + 0..T-1` of
    cache `rows` and see the row's committed slots plus the new tokens `tree_mask` allows
    (causal order when None). positions [b, T] are the RoPE positions. `static`: keys over
    the whole cache and a fixed tree tail, so the shapes do not depend on the lengths.
    `kernel`: the model may run attention in the C kernel (`plan_attention` decides)."""
    b, t = positions.shape
    device = positions.device
    slots = lengths[:, None] + torch.arange(t, device=device)  # [b, T]
    key_len = cache.capacity if static else min(cache.capacity, -(-(int(slots.max()) + 1) // BLOCK) * BLOCK)
    if tree_mask is None:
        tree_mask = torch.ones(t, t, dtype=torch.bool, device=device).tril().expand(b, t, t)
    freqs = positions[..., None].float() * inv_freq.to(device)  # [b, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [b, 1, T, hd]
    plan = plan_attention(lengths=lengths, slots=slots, rows=rows, key_len=key_len, tree_mask=tree_mask,
                          kernel=kernel, static=static)
    return StepInputs(cache=cache, slots=slots, rows=rows, key_len=key_len, cos=emb.cos(), sin=emb.sin(), plan=plan)


class Inner(nn.Module):
    """Holds the `model.*` parameters (HF naming)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.quantization = "none"
        self.model = Inner(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # a plain attribute, not a buffer: `.to(bfloat16)` must not round the frequencies
        self.inv_freq = rope_inv_freq(cfg)
        # the LM head as the forward pass runs it, when not `head_weight` as is: a quantized
        # copy (models/quantize.py, the "-all" settings) or a packed one (models/packed.py)
        self.head_proj: nn.Module | None = None
        # run passes over <= BLOCK tokens at one shape (`_static_forward`); None: on CUDA
        self.static_shapes: bool | None = None
        # decode / verify attention in the C kernel (kernels/attention.py); None: wherever it runs
        self.attention_kernel: bool | None = None

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head: final-norm states `[..., hidden]` -> logits `[..., vocab]`."""
        if self.head_proj is not None:
            return proj(self.head_proj, x)
        return padded_linear(x, self.head_weight, None)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        c = self.config
        cap = min(capacity, c.max_position_embeddings) + BLOCK  # room for padding slots
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, c.head_dim, cap, self.dtype, self.device)

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,  # [batch, T]
        positions: torch.Tensor,  # [batch, T]
        cache: KVCache,
        *,
        tree_mask: torch.Tensor | None = None,  # [batch, T, T] bool among new tokens; None = causal
        rows: torch.Tensor | None = None,  # [batch] cache rows; None = rows 0..batch-1
        logits_at: torch.Tensor | None = None,  # [batch, n] indices into T; None = all
        hidden_layers: Sequence[int] = (),  # layer outputs to return (-1 = before final norm)
        compute_logits: bool = True,
    ) -> ModelOutput:
        t = ids.shape[1]
        if self.runs_static_shapes and t <= BLOCK and int(cache.lengths.max()) + BLOCK <= cache.capacity:
            return self._static_forward(ids, positions, cache, tree_mask, rows, logits_at, hidden_layers,
                                        compute_logits)
        return self._forward(ids, positions, cache, tree_mask, rows, logits_at, hidden_layers, compute_logits)

    def _forward(self, ids, positions, cache, tree_mask, rows, logits_at, hidden_layers, compute_logits,
                 static: bool = False) -> ModelOutput:
        """The pass itself (`static`: at the static shape `_static_forward` built)."""
        b = ids.shape[0]
        device = ids.device
        lengths = cache.lengths[:b] if rows is None else cache.lengths[rows]  # [batch]
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        step = step_inputs(self.inv_freq, positions, cache, lengths, rows, tree_mask, static,
                           self.attention_in_kernel())
        x = self.model.embed_tokens(ids)
        wanted = {(i if i >= 0 else len(self.model.layers) + i) for i in hidden_layers}
        hidden: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.model.layers):
            x = layer(x, step)
            if i in wanted:
                hidden[i] = x
        if not compute_logits:
            return ModelOutput(None, hidden)
        if logits_at is not None:
            x = torch.gather(x, 1, logits_at[..., None].expand(-1, -1, x.shape[-1]))
        x = self.model.norm(x)
        return ModelOutput(self.head(x), hidden)

    @property
    def runs_static_shapes(self) -> bool:
        """`static_shapes`, or when unset: on CUDA."""
        return self.static_shapes if self.static_shapes is not None else self.device.type == "cuda"

    def attention_in_kernel(self) -> bool:
        """Whether decode and verify passes run attention in the C kernel: never at static
        shapes (their torch recipe is the one CUDA runs), else `attention_kernel` when set,
        else wherever the kernel takes this model (CPU, fp32/bf16, its shapes)."""
        if self.runs_static_shapes:
            return False
        if self.attention_kernel is not None:
            return self.attention_kernel
        c = self.config
        return attention_kernel.takes(c.num_attention_heads, c.num_key_value_heads, c.head_dim, self.dtype, self.device)

    def _static_forward(self, ids, positions, cache, tree_mask, rows, logits_at, hidden_layers, compute_logits):
        """The pass at one shape whatever it holds: every cache row (rows the pass does not
        name run filler tokens in their spare slots, which nothing reads), BLOCK tokens
        each (the padding continues each row's chain or hangs off its tree), keys over the
        whole cache; logits for every position, then the ones asked for."""
        b, t = ids.shape
        n, device = cache.batch_size, ids.device
        named = list(range(b)) if rows is None else rows.tolist()
        spare = [r for r in range(n) if r not in set(named)]
        all_rows = None if named + spare == list(range(n)) else torch.tensor(named + spare, device=device)
        lengths = cache.lengths if all_rows is None else cache.lengths[all_rows]
        steps = torch.arange(BLOCK, device=device)
        pad_ids = ids.new_zeros(n, BLOCK)
        pad_ids[:b, :t] = ids
        pad_pos = lengths[:, None] + steps
        pad_pos[:b, :t] = positions
        pad_pos[:b, t:] = positions[:, -1:] + 1 + steps[: BLOCK - t]
        mask = None
        if tree_mask is not None:
            mask = torch.ones(BLOCK, BLOCK, dtype=torch.bool, device=device).tril().repeat(n, 1, 1)
            mask[:b, :t, :t] = tree_mask
        out = self._forward(pad_ids, pad_pos, cache, mask, all_rows, None, hidden_layers, compute_logits, static=True)
        hidden = {k: v[:b, :t] for k, v in out.hidden.items()}
        if out.logits is None:
            return ModelOutput(None, hidden)
        logits = out.logits[:b]
        if logits_at is not None:
            return ModelOutput(torch.gather(logits, 1, logits_at[..., None].expand(-1, -1, logits.shape[-1])), hidden)
        return ModelOutput(logits[:, :t], hidden)


def build_mask(lengths: torch.Tensor, slots: torch.Tensor, key_len: int, tree_mask: torch.Tensor) -> torch.Tensor:
    """Attention mask `[batch, 1, T, key_len]`: every committed slot of the row, plus the
    new tokens that `tree_mask` [batch, T, T] allows."""
    b, t = slots.shape
    device = slots.device
    keys = torch.arange(key_len, device=device)
    mask = (keys[None, None, :] < lengths[:, None, None]).expand(b, t, key_len).clone()  # [b, T, S]
    mask.scatter_(2, slots[:, None, :].expand(b, t, t), tree_mask)
    return mask[:, None]
