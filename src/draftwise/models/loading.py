"""Load a model's config, weights and tokenizer for the native decoder.

`load_weights(model)` accepts a Hugging Face folder (config.json + safetensors), a `.gguf`
file, a bundled short name (see `bundled.py`) or a Hugging Face Hub id, and returns
`LoadedWeights` (models/weights.py): a `ModelConfig`, a state dict with Hugging Face
parameter names (CPU tensors, fp32 or bf16) and a tokenizer with its chat template.
GGUF files are read by models/gguf.py and kept converted by models/conversion_cache.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from draftwise.errors import CorruptModel, ModelNotFound
from draftwise.models import bundled
from draftwise.models.config import ModelConfig, UnsupportedArchitecture
from draftwise.models.conversion_cache import cache_key, load_gguf_cached
from draftwise.models.weights import LoadedWeights, checked_weights, expected_shapes, stop_ids


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
        return load_gguf_cached(path, cache_key(path.stem, ident), cache_dir, progress, str(path))
    if model not in bundled.BUNDLED and (os.sep in model or model.lower().endswith(".gguf")):
        raise ModelNotFound(f"{model}: no such file or folder")
    spec = bundled.get_bundled(model)  # unknown: ModelNotFound listing the bundled names
    gguf = bundled.ensure(model, progress=progress, cache_dir=cache_dir)
    return load_gguf_cached(gguf, cache_key(model, spec.sha256), cache_dir, progress, model)

# --- Hugging Face folders ---------------------------------------------------------------


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
    cfg = cfg.model_copy(update={"eos_token_ids": stop_ids(eos, tok)})
    return LoadedWeights(cfg, checked_weights(cfg, sd, str(folder)), tok, str(folder))


__all__ = ["LoadedWeights", "expected_shapes", "load_weights"]
