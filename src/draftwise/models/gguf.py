"""GGUF files (llama.cpp's format) -> `LoadedWeights`: tensors dequantized with the `gguf`
package and renamed to Hugging Face names, the q/k projection rows that llama.cpp's
converter permutes for the `llama` architecture permuted back, the config and tokenizer
read from the file's metadata. Values come back as float32, which holds every dequantized
value exactly (see models/conversion_cache.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import ValidationError
from tqdm import tqdm

from draftwise.errors import CorruptModel
from draftwise.models.config import ModelConfig, UnsupportedArchitecture
from draftwise.models.weights import LoadedWeights, checked_weights, stop_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_GGUF_ARCHS = {"llama": True, "qwen2": False, "qwen3": False}  # arch -> q/k rows permuted
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}  # fmt: skip
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _open_gguf(path: Path) -> Any:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        for t in reader.tensors:  # a truncated file has short tensor data
            if t.data.size * t.data.itemsize != t.n_bytes:
                raise ValueError(f"tensor {t.name} is truncated")
        return reader
    except Exception as exc:  # noqa: BLE001 - the reader raises many kinds on bad input
        raise CorruptModel(f"{path} is not a valid GGUF file ({exc}); re-download it") from None


def _meta(reader: Any, key: str, default: Any = None) -> Any:
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    if field.types == [GGUFValueType.FLOAT32]:  # shortest float32 text: 1e-05, not 9.99e-06
        value = float(str(np.float32(value)))
    return value


def _owned(a: np.ndarray) -> np.ndarray:
    """A writable C-contiguous array (F32 tensors come back as views of the read-only map)."""
    return np.ascontiguousarray(a) if a.flags.writeable else a.copy()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rope pairs -> HF half split)."""
    pairs = w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
    return pairs.swapaxes(1, 2).reshape(w.shape)


def _llama3_scaling(freqs: np.ndarray, theta: float, head_dim: int) -> dict[str, Any] | None:
    """Recognise llama.cpp's rope_freqs tensor as Llama 3 rope scaling (standard params)."""
    factor, low, high, orig = float(freqs.max()), 1.0, 4.0, 8192
    if factor == 1.0:
        return None
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
    expect = 1.0 / ((1 - smooth) / factor + smooth)
    if expect.shape != freqs.shape or not np.allclose(expect, freqs, rtol=1e-3):
        raise UnsupportedArchitecture("llama with non-standard rope_freqs (GGUF)")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": orig}  # fmt: skip


def _gguf_rope_scaling(reader: Any, arch: str) -> dict[str, Any] | None:
    kind = _meta(reader, f"{arch}.rope.scaling.type", "none")
    factor = _meta(reader, f"{arch}.rope.scaling.factor")
    if kind == "none" or not factor or factor == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        orig = _meta(reader, f"{arch}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig}
    raise UnsupportedArchitecture(f"{arch} with {kind} rope scaling (GGUF)")


def _gguf_config(reader: Any, arch: str, tensors: dict[str, np.ndarray]) -> ModelConfig:
    heads = _meta(reader, f"{arch}.attention.head_count")
    try:
        q_rows = tensors["model.layers.0.self_attn.q_proj.weight"].shape[0]
        vocab = tensors["model.embed_tokens.weight"].shape[0]
    except KeyError as exc:
        raise CorruptModel(f"GGUF lacks tensor {exc}; the file is incomplete") from None
    head_dim = _meta(reader, f"{arch}.attention.key_length") or q_rows // heads
    theta = _meta(reader, f"{arch}.rope.freq_base", 10000.0)
    rope_scaling = _gguf_rope_scaling(reader, arch)
    if "rope_freqs.weight" in tensors and rope_scaling is None:
        rope_scaling = _llama3_scaling(tensors.pop("rope_freqs.weight"), theta, head_dim)
    eos = _meta(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=_meta(reader, f"{arch}.embedding_length"),
        intermediate_size=_meta(reader, f"{arch}.feed_forward_length"),
        num_hidden_layers=_meta(reader, f"{arch}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=_meta(reader, f"{arch}.attention.head_count_kv") or heads,
        head_dim=head_dim,
        rms_norm_eps=_meta(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=_meta(reader, f"{arch}.context_length", 4096),
        tie_word_embeddings="lm_head.weight" not in tensors,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in tensors,
        qk_norm="model.layers.0.self_attn.q_norm.weight" in tensors,
        bos_token_id=_meta(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[] if eos is None else [eos],
    )


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[gguf_name]
    parts = gguf_name.split(".")  # blk.N.kind.(weight|bias)
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return "rope_freqs.weight" if gguf_name == "rope_freqs.weight" else None


def load_gguf(path: Path, progress: bool, source: str) -> LoadedWeights:
    from gguf.quants import dequantize

    reader = _open_gguf(path)
    arch = _meta(reader, "general.architecture", "")
    if arch not in _GGUF_ARCHS:
        raise UnsupportedArchitecture(arch or "unknown (GGUF)")
    arrays: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc=f"dequantizing {path.name}", disable=not progress):
        name = _hf_name(t.name)
        if name is None:
            raise UnsupportedArchitecture(f"{arch} with tensor {t.name} (GGUF)")
        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise CorruptModel(f"{path}: {exc}; use a GGUF with a common quantization") from None
        shape = tuple(reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        arrays[name] = np.asarray(values, dtype=np.float32).reshape(shape)
    try:
        cfg = _gguf_config(reader, arch, arrays)
    except (ValidationError, TypeError) as exc:  # missing or ill-typed metadata
        why = f"{exc.errors()[0]['loc']}" if isinstance(exc, ValidationError) else str(exc)
        raise CorruptModel(f"{path}: incomplete GGUF metadata ({why}); re-download it") from None
    if _GGUF_ARCHS[arch]:
        for name in list(arrays):
            if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
                n = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
                arrays[name] = _unpermute(arrays[name], n)
    sd = {k: torch.from_numpy(_owned(v)) for k, v in arrays.items()}
    tok = _gguf_tokenizer(path)
    cfg = cfg.model_copy(update={"eos_token_ids": stop_ids(cfg.eos_token_ids, tok)})
    return LoadedWeights(cfg, checked_weights(cfg, sd, str(path)), tok, source)


def _gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise CorruptModel(f"{path}: cannot build a tokenizer from its metadata ({exc})") from None
