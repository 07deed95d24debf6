"""What a loaded model is, whatever its source: `LoadedWeights` (config, state dict with
Hugging Face names, tokenizer), the tensors the native decoder reads (`expected_shapes`,
`checked_weights`) and the token ids that end generation (`stop_ids`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from draftwise.errors import CorruptModel
from draftwise.models.config import ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Tokens that end a chat turn (or a document); added to the EOS ids when in the vocab.
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")


@dataclass
class LoadedWeights:
    """Everything the native decoder needs to build a model."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # Hugging Face names, CPU tensors (fp32 or bf16)
    tokenizer: PreTrainedTokenizerBase  # chat_template set when the source has one
    source: str  # human-readable: path or bundled name


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The Hugging Face parameter names (and shapes) the native decoder reads for `cfg`."""
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if cfg.attention_bias:
            bias = {"q": q, "k": kv, "v": kv}
            shapes |= {p + f"self_attn.{x}_proj.bias": (n,) for x, n in bias.items()}
        if cfg.qk_norm:
            shapes |= {p + f"self_attn.{x}_norm.weight": (hd,) for x in "qk"}
    return shapes


def checked_weights(cfg: ModelConfig, sd: dict[str, torch.Tensor], src: str) -> dict[str, torch.Tensor]:
    """Keep exactly the expected tensors; CorruptModel on a missing one or a wrong shape."""
    out = {}
    for name, shape in expected_shapes(cfg).items():
        t = sd.get(name)
        if t is None:
            raise CorruptModel(f"{src}: tensor {name} is missing; the model file is incomplete")
        if tuple(t.shape) != shape:
            raise CorruptModel(f"{src}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        out[name] = t if t.dtype in (torch.float32, torch.bfloat16) else t.float()
    return out


def stop_ids(base: list[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids from the model plus the tokenizer's EOS and any chat end token in the vocab."""
    ids = list(dict.fromkeys(base))
    vocab = tokenizer.get_vocab()
    for tid in [tokenizer.eos_token_id, *(vocab.get(t) for t in _END_TOKENS)]:
        if isinstance(tid, int) and tid not in ids:
            ids.append(tid)
    return ids
