"""Load a model's config, weights and tokenizer for the native decoder.

`load_weights(model)` accepts a Hugging Face folder (config.json + safetensors), a `.gguf`
file, or a bundled short name (see `bundled.py`), and returns `LoadedWeights`: a
`ModelConfig`, a state dict with Hugging Face parameter names (CPU tensors, fp32 or bf16)
and a tokenizer with its chat template.

GGUF files are dequantized with the `gguf` package; the q/k projection rows that
llama.cpp's converter permutes for the `llama` architecture are permuted back. The result
is cached under `<cache>/converted/<key>/` (model.safetensors, config.json with the
ModelConfig, tokenizer/) so later loads skip dequantization and tokenizer conversion.

Storage dtype of the cache: float32. Dequantized values (scale * q + min with fp16 scales,
K-quant super-blocks, Q8_0) need more mantissa bits than fp16 or bf16 hold; they were
checked to be inexact in both for Q4_1, Q5_0, Q8_0, Q4_K and Q6_K. float32 holds them
exactly, so the first load and every cached load give bit-identical tensors (the GGUF
path returns float32 too). Callers wanting bf16 can cast after loading.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import ValidationError
from tqdm import tqdm

from draftwise.errors import CorruptModel, ModelNotFound
from draftwise.models import bundled
from draftwise.models.config import ModelConfig, UnsupportedArchitecture

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CACHE_VERSION = 1
_DONE = "draftwise-cache.json"
# Tokens that end a chat turn (or a document); added to the EOS ids when in the vocab.
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
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


@dataclass
class LoadedWeights:
    """Everything the native decoder needs to build a model."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # Hugging Face names, CPU tensors (fp32 or bf16)
    tokenizer: PreTrainedTokenizerBase  # chat_template set when the source has one
    source: str  # human-readable: path or bundled name


def load_weights(
    model: str, *, cache_dir: Path | None = None, progress: bool = True, revision: str | None = None
) -> LoadedWeights:
    """Load a Hugging Face folder, a .gguf file, a bundled model name, or a Hugging Face Hub
    id (`org/name`, fetched into the Hugging Face cache; `revision` pins it)."""
    from draftwise.models import hub

    if model not in bundled.BUNDLED and hub.looks_like_hub_id(model):
        return _load_hf_folder(hub.fetch(model, revision, progress))
    if revision is not None:
        raise ModelNotFound(f"--revision applies to Hugging Face Hub ids (org/name), not to {model}")
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return _load_hf_folder(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelNotFound(f"{path} has no config.json (and not exactly one .gguf file)")
        path = ggufs[0]
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFound(f"{path}: expected a .gguf file or a Hugging Face model folder")
        st = path.resolve().stat()
        ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        return _load_gguf_cached(path, _cache_key(path.stem, ident), cache_dir, progress, str(path))
    if model not in bundled.BUNDLED and (os.sep in model or model.lower().endswith(".gguf")):
        raise ModelNotFound(f"{model}: no such file or folder")
    spec = bundled.get_bundled(model)  # unknown: ModelNotFound listing the bundled names
    gguf = bundled.ensure(model, progress=progress, cache_dir=cache_dir)
    return _load_gguf_cached(gguf, _cache_key(model, spec.sha256), cache_dir, progress, model)


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


def _checked(cfg: ModelConfig, sd: dict[str, torch.Tensor], src: str) -> dict[str, torch.Tensor]:
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


def _stop_ids(base: list[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids from the model plus the tokenizer's EOS and any chat end token in the vocab."""
    ids = list(dict.fromkeys(base))
    vocab = tokenizer.get_vocab()
    for tid in [tokenizer.eos_token_id, *(vocab.get(t) for t in _END_TOKENS)]:
        if isinstance(tid, int) and tid not in ids:
            ids.append(tid)
    return ids


# ---------------------------------------------------------------- Hugging Face folders


def _load_hf_folder(folder: Path) -> LoadedWeights:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    index = folder / "model.safetensors.index.json"
    try:
        cfg = ModelConfig.from_hf_dict(json.loads((folder / "config.json").read_text()))
        shards = sorted(folder.glob("*.safetensors"))
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted({folder / f for f in weight_map.values()})
    except UnsupportedArchitecture:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptModel(f"{folder}: config.json or the index is unreadable ({exc})") from None
    if not shards:
        raise CorruptModel(f"{folder} has no *.safetensors weights (draftwise reads safetensors)")
    sd: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            sd |= load_file(shard)
        except (SafetensorError, OSError) as exc:
            raise CorruptModel(f"{shard} is unreadable ({exc}); re-download the model") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise CorruptModel(f"{folder}: could not load the tokenizer ({exc})") from None
    gen = folder / "generation_config.json"
    eos = list(cfg.eos_token_ids)
    if gen.is_file():
        gen_eos = json.loads(gen.read_text()).get("eos_token_id")
        eos += [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    cfg = cfg.model_copy(update={"eos_token_ids": _stop_ids(eos, tok)})
    return LoadedWeights(cfg, _checked(cfg, sd, str(folder)), tok, str(folder))


# ---------------------------------------------------------------------------- GGUF


def _cache_key(label: str, ident: str) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{ident}".encode()).hexdigest()[:16]
    return f"{label}-{digest}"


def _load_gguf_cached(
    path: Path, key: str, cache_dir: Path | None, progress: bool, source: str
) -> LoadedWeights:
    folder = bundled.cache_root(cache_dir) / "converted" / key
    if (folder / _DONE).is_file():
        try:
            return _read_cache(folder, source)
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt from the GGUF
            shutil.rmtree(folder, ignore_errors=True)
    loaded = _load_gguf(path, progress, source)
    try:
        _write_cache(folder, loaded)
    except OSError as exc:  # e.g. disk full: the weights are fine, only the cache is lost
        warnings.warn(f"draftwise: cannot cache converted weights in {folder}: {exc}", stacklevel=2)
    return loaded


def _read_cache(folder: Path, source: str) -> LoadedWeights:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    cfg = ModelConfig.model_validate_json((folder / "config.json").read_text())
    sd = load_file(folder / "model.safetensors")
    tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    return LoadedWeights(cfg, _checked(cfg, sd, str(folder)), tok, source)


def _write_cache(folder: Path, loaded: LoadedWeights) -> None:
    """Write atomically: a temp folder renamed into place once complete."""
    from safetensors.torch import save_file

    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(loaded.state_dict, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(loaded.config.model_dump_json(indent=2))
        loaded.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / _DONE).write_text(json.dumps({"version": CACHE_VERSION, "source": loaded.source}))
        if folder.exists() and not (folder / _DONE).is_file():
            shutil.rmtree(folder, ignore_errors=True)  # left over from an interrupted run
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / _DONE).is_file():  # else another process just finished it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def _load_gguf(path: Path, progress: bool, source: str) -> LoadedWeights:
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
    cfg = cfg.model_copy(update={"eos_token_ids": _stop_ids(cfg.eos_token_ids, tok)})
    return LoadedWeights(cfg, _checked(cfg, sd, str(path)), tok, source)


def _gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise CorruptModel(f"{path}: cannot build a tokenizer from its metadata ({exc})") from None


__all__ = ["LoadedWeights", "expected_shapes", "load_weights"]
