"""The EAGLE draft head: one decoder layer over target features and token embeddings.

The head works on *pairs*: pair i joins the target's feature of token i with the
embedding of token i+1, and its output estimates the feature of token i+1, from which an
LM head predicts token i+2. Two styles, after the public checkpoints:

- `eagle1` (EAGLE-1/2): the feature is the target's last layer after its final norm;
  x = fc([embedding ; feature]) (2H -> H, with bias), then a decoder layer whose first
  input norm is absent; its output goes through the *target's* LM head, no norm. When
  drafting further, the head's own output replaces the feature.
- `eagle3` (EAGLE-3): the feature fuses low, middle and high target layers,
  x = fc([f_low ; f_mid ; f_high]) (3H -> H, no bias); the layer attends over
  [input_norm(embedding) ; hidden_norm(x)] (2H wide q/k/v projections) with x as the
  residual; a final norm and the head's own LM head over a reduced draft vocabulary
  follow (`d2t`: target id = draft id + d2t[draft id]). When drafting further, the head's
  output replaces x directly (no fc).

`EagleConfig.feature_layers` uses the native decoder's numbering: layer i's *output*
(EAGLE-3's "layer 2" capture is the input of layer 2, i.e. our 1). The same module serves
inference (`forward_cached`, keys/values in a `KVCache`) and training (`project`,
`attend`, `finish`, with any attention mask the trainer builds).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from draftwise.cache import KVCache
from draftwise.models.transformer import RMSNorm, apply_rope, rope_inv_freq


class EagleConfig(BaseModel):
    """Shape of a head, and how it reads the target."""

    model_config = ConfigDict(extra="forbid")

    style: Literal["eagle1", "eagle3"]
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    vocab_size: int = Field(gt=0, description="the target's vocabulary")
    draft_vocab_size: int = Field(gt=0, description="the head's LM head rows (== vocab_size: no reduction)")
    feature_layers: list[int] = Field(description="target layer outputs fused, native numbering (-1 = last)")
    feature_size: int = Field(gt=0, description="hidden size of the target (width of one feature)")
    feature_norm: bool = Field(description="apply the target's final norm to the feature (EAGLE-1)")
    fc_bias: bool = True
    input_norm: bool = Field(default=False, description="eagle1: input norm before attention")
    final_norm: bool = Field(default=False, description="a norm before the LM head (eagle3)")
    own_lm_head: bool = Field(default=False, description="else the target's LM head is used")
    own_embedding: bool = Field(default=False, description="else the target's embedding is used")
    norm_before_residual: bool = Field(default=False, description="eagle3 variant: the residual is hidden_norm(x)")
    target_num_hidden_layers: int | None = Field(default=None, gt=0,
                                                 description="layers of the target it was made for (None: unknown)")

    @property
    def reduced_vocab(self) -> bool:
        return self.draft_vocab_size != self.vocab_size

    def resolved_layers(self, num_target_layers: int) -> list[int]:
        """feature_layers as non-negative indices of a target with that many layers."""
        out = [i if i >= 0 else num_target_layers + i for i in self.feature_layers]
        if any(not 0 <= i < num_target_layers for i in out):
            raise ValueError(f"feature layers {self.feature_layers} outside a {num_target_layers}-layer target")
        return out


def default_eagle3_layers(num_target_layers: int) -> list[int]:
    """EAGLE-3's low/middle/high capture points (inputs of layers 2, L/2, L-3) in our numbering."""
    n = num_target_layers
    return sorted({max(0, i - 1) for i in (2, n // 2, n - 3)})


class HeadAttention(nn.Module):
    def __init__(self, cfg: EagleConfig, in_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(in_dim, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(in_dim, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(in_dim, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)


class HeadMLP(nn.Module):
    def __init__(self, cfg: EagleConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):  # fused by with_kernels
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HeadLayer(nn.Module):
    """Parameter holder of the head's decoder layer (names follow the public checkpoints)."""

    def __init__(self, cfg: EagleConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        eagle3 = cfg.style == "eagle3"
        self.self_attn = HeadAttention(cfg, 2 * h if eagle3 else h)
        self.mlp = HeadMLP(cfg)
        if eagle3 or cfg.input_norm:
            self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        if eagle3:
            self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)


class EagleHead(nn.Module):
    def __init__(self, cfg: EagleConfig) -> None:
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        fc_in = 2 * h if cfg.style == "eagle1" else len(cfg.feature_layers) * cfg.feature_size
        self.fc = nn.Linear(fc_in, h, bias=cfg.fc_bias)
        self.layer = HeadLayer(cfg)
        if cfg.final_norm:
            self.norm = RMSNorm(h, cfg.rms_norm_eps)
        if cfg.own_lm_head:
            self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        if cfg.own_embedding:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        if cfg.reduced_vocab:
            self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.inv_freq = rope_inv_freq(cfg)  # plain attribute: never rounded by .to(dtype)

    @property
    def device(self) -> torch.device:
        return self.layer.post_attention_layernorm.weight.device  # a norm: never swapped by with_kernels

    @property
    def dtype(self) -> torch.dtype:
        return self.layer.post_attention_layernorm.weight.dtype

    # --- pieces shared by inference and training ---------------------------------------

    def embed(self, ids: torch.Tensor, target_embedding: nn.Embedding) -> torch.Tensor:
        """Token ids (target vocabulary) [..., T] -> embeddings [..., T, H]."""
        table = self.embed_tokens if self.config.own_embedding else target_embedding
        return table(ids)

    def stream_input(self, feat: torch.Tensor, emb: torch.Tensor, fused: bool) -> torch.Tensor:
        """The residual stream x [b, T, H] of pairs (feature, embedding).

        fused=True: `feat` holds target features [b, T, n_layers * feature_size];
        False: the head's own outputs [b, T, H] (drafting past the first token)."""
        if self.config.style == "eagle1":
            return self.fc(torch.cat([emb, feat.to(emb.dtype)], dim=-1))
        return self.fc(feat) if fused else feat

    def project(self, x: torch.Tensor, emb: torch.Tensor, positions: torch.Tensor):
        """q [b, heads, T, hd] and k, v [b, kv_heads, T, hd] (rotary applied)."""
        layer, attn = self.layer, self.layer.self_attn
        if self.config.style == "eagle3":
            a = torch.cat([layer.input_layernorm(emb), layer.hidden_norm(x)], dim=-1)  # [b, T, 2H]
        else:
            a = layer.input_layernorm(x) if self.config.input_norm else x
        b, t, _ = a.shape
        if hasattr(attn, "qkv_proj"):  # fused by with_kernels
            kv = attn.kv_heads * attn.head_dim
            q, k, v = attn.qkv_proj(a).split([attn.heads * attn.head_dim, kv, kv], dim=-1)
        else:
            q, k, v = attn.q_proj(a), attn.k_proj(a), attn.v_proj(a)
        q = q.reshape(b, t, attn.heads, attn.head_dim).transpose(1, 2)
        k = k.reshape(b, t, attn.kv_heads, attn.head_dim).transpose(1, 2)
        v = v.reshape(b, t, attn.kv_heads, attn.head_dim).transpose(1, 2)
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # [b, T, hd/2]
        rot = torch.cat([freqs, freqs], dim=-1)[:, None]  # [b, 1, T, hd]
        cos, sin = rot.cos(), rot.sin()
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [b, h, T, hd], k/v [b, kvh, S, hd], mask [b, 1, T, S] bool -> [b, T, h * hd]."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
        b, h, t, hd = out.shape
        return out.transpose(1, 2).reshape(b, t, h * hd)

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual + o_proj, then the MLP block: the head's output feature [b, T, H]."""
        layer = self.layer
        if self.config.norm_before_residual:
            x = layer.hidden_norm(x)
        x = x + layer.self_attn.o_proj(attn_out)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def logits(self, out: torch.Tensor, target_head: torch.Tensor) -> torch.Tensor:
        """Output features [..., H] -> logits over the draft vocabulary [..., draft_vocab]."""
        if self.config.final_norm:
            out = self.norm(out)
        if self.config.own_lm_head:
            return self.lm_head(out)
        weight = target_head[self.draft_ids()] if self.config.reduced_vocab else target_head
        return F.linear(out, weight)

    def draft_ids(self) -> torch.Tensor:
        """Target id of each draft-vocabulary row [draft_vocab]."""
        base = torch.arange(self.config.draft_vocab_size, device=self.device)
        return base + self.d2t if self.config.reduced_vocab else base

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids] if self.config.reduced_vocab else draft_ids

    # --- inference ----------------------------------------------------------------------

    def forward_cached(
        self,
        x: torch.Tensor,  # [b, T, H] residual stream (see stream_input)
        emb: torch.Tensor,  # [b, T, H]
        positions: torch.Tensor,  # [b, T]
        cache: KVCache,
        rows: torch.Tensor,  # [b] cache rows
        slots: torch.Tensor,  # [b, T] where the new keys/values go
        mask: torch.Tensor,  # [b, 1, T, S] over cache slots 0..S-1 (new slots included)
    ) -> torch.Tensor:
        """One pass over new pairs whose context lies in `cache`: output features [b, T, H]."""
        q, k, v = self.project(x, emb, positions)
        cache.write(0, k, v, slots, rows)
        keys, values = cache.layer(0, mask.shape[-1])
        return self.finish(x, self.attend(q, keys[rows], values[rows], mask))


# --- inference on the target's CPU kernels --------------------------------------------------


class KernelLinear(nn.Module):
    """Inference stand-in for an `nn.Linear`: a module with `rows` (models/packed.py,
    models/quantize.py) applied to the flattened leading dimensions."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.rows(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)


def with_kernels(head: EagleHead, quantization: str = "none", between: Callable[[], None] | None = None) -> EagleHead:
    """A copy of `head` for drafting whose projections run in the kernels the target uses:
    on the CPU oneDNN's packed weights (unquantized targets) or the target's quantization
    kernel (`w4a8` / `w8a8` / `int8` / `int4`; the own LM head in int8 for the `-all` settings
    and for w4a8/w8a8), q/k/v and gate/up fused. A draft only chooses which tokens are
    verified, so this changes speed and perhaps which tokens are proposed, never the
    output. Elsewhere (CUDA, or no oneDNN) the head is returned as it is. Kernels that
    refuse a shape leave that projection as it was. `between`, when given, is called before
    each projection is converted (the online learner stops there when a request arrives)."""
    import copy

    from draftwise.models import packed, quantize

    if head.device.type != "cpu":
        return head
    kind = quantization.removesuffix("-all")
    kinds = {"w4a8": quantize.W4A8Linear, "w8a8": quantize.W8A8Linear, "int8": quantize.Int8Linear,
             "int4": quantize.Int4Linear}
    make = kinds.get(kind)
    if make is None:
        if not packed.available(head.dtype):
            return head
        make = packed.PackedLinear
    head_make = quantize.W8A8Linear if kind in ("w4a8", "w8a8") else quantize.Int8Linear if kind in kinds else make
    fast = copy.deepcopy(head)
    dtype = head.dtype

    def swap(parent: nn.Module, name: str, linears: list[nn.Linear], maker) -> None:
        if between is not None:
            between()
        weight = torch.cat([lin.weight.data for lin in linears])
        biases = [lin.bias for lin in linears]
        bias = None if all(b is None for b in biases) else torch.cat(
            [lin.weight.new_zeros(lin.out_features) if lin.bias is None else lin.bias.data for lin in linears])
        try:
            module = KernelLinear(maker(weight, bias, dtype))
        except (ValueError, RuntimeError):  # a shape or dtype this kernel refuses
            return
        for lin_name in {n for n, m in parent.named_children() if any(m is lin for lin in linears)}:
            delattr(parent, lin_name)
        setattr(parent, name, module)

    attn, mlp = fast.layer.self_attn, fast.layer.mlp
    swap(fast, "fc", [fast.fc], make)
    swap(attn, "qkv_proj", [attn.q_proj, attn.k_proj, attn.v_proj], make)
    swap(attn, "o_proj", [attn.o_proj], make)
    swap(mlp, "gate_up_proj", [mlp.gate_proj, mlp.up_proj], make)
    swap(mlp, "down_proj", [mlp.down_proj], make)
    if fast.config.own_lm_head:
        swap(fast, "lm_head", [fast.lm_head], head_make)
    return fast.eval()


def target_features(cfg: EagleConfig, target, hidden: dict[int, torch.Tensor], layers: list[int]) -> torch.Tensor:
    """The head's input feature per token [n, F] from target hidden states {layer: [n, H]}."""
    if cfg.feature_norm:
        return target.model.norm(hidden[layers[-1]])
    return torch.cat([hidden[i] for i in layers], dim=-1)


def init_head_from_target(cfg: EagleConfig, target, draft_to_target: torch.Tensor | None = None,
                          seed: int = 0) -> EagleHead:
    """A fresh head with small random weights and norms at one. `draft_to_target` [draft_vocab]:
    the target id of each draft-vocabulary row (a reduced vocabulary); an own LM head starts
    from the target's rows of those tokens, an own embedding from the target's table."""
    torch.manual_seed(seed)
    head = EagleHead(cfg)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if "norm" in name:
                continue
            if name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
        if cfg.reduced_vocab:
            if draft_to_target is None or len(draft_to_target) != cfg.draft_vocab_size:
                raise ValueError("a reduced draft vocabulary needs the target id of each draft row")
            head.d2t.copy_(draft_to_target.long() - torch.arange(cfg.draft_vocab_size))
        if cfg.own_lm_head:
            rows = head.draft_ids().to(target.head_weight.device)
            head.lm_head.weight.copy_(target.head_weight.detach()[rows].float())
        if cfg.own_embedding:
            head.embed_tokens.weight.copy_(target.model.embed_tokens.weight.detach().float())
    return head


def config_for_target(tcfg, style: str = "eagle3", draft_vocab_size: int | None = None,
                      feature_layers: list[int] | None = None) -> EagleConfig:
    """A head shaped like one layer of the target (`ModelConfig` tcfg), in the given style."""
    eagle3 = style == "eagle3"
    if feature_layers is None:
        feature_layers = default_eagle3_layers(tcfg.num_hidden_layers) if eagle3 else [tcfg.num_hidden_layers - 1]
    vocab = tcfg.vocab_size
    return EagleConfig(
        style=style, hidden_size=tcfg.hidden_size, intermediate_size=tcfg.intermediate_size,
        num_attention_heads=tcfg.num_attention_heads, num_key_value_heads=tcfg.num_key_value_heads,
        head_dim=tcfg.head_dim, rms_norm_eps=tcfg.rms_norm_eps, rope_theta=tcfg.rope_theta,
        rope_scaling=tcfg.rope_scaling, attention_bias=False, vocab_size=vocab,
        draft_vocab_size=min(draft_vocab_size or vocab, vocab), feature_layers=feature_layers,
        feature_size=tcfg.hidden_size, feature_norm=not eagle3, fc_bias=not eagle3, input_norm=eagle3,
        final_norm=eagle3, own_lm_head=eagle3, own_embedding=False,
        target_num_hidden_layers=tcfg.num_hidden_layers,
    )
