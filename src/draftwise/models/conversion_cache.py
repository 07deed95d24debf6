"""The conversion cache: a GGUF's weights, config and tokenizer, once converted, are kept
under `<cache>/converted/<key>/` (model.safetensors, config.json with the ModelConfig,
tokenizer/) so later loads skip dequantization and tokenizer conversion. Written
atomically (a temp folder renamed into place); a damaged entry is rebuilt from the GGUF.

Storage dtype: float32. Dequantized values (scale * q + min with fp16 scales, K-quant
super-blocks, Q8_0) need more mantissa bits than fp16 or bf16 hold; they were checked to
be inexact in both for Q4_1, Q5_0, Q8_0, Q4_K and Q6_K. float32 holds them exactly, so the
first load and every cached load give bit-identical tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

from draftwise.models import bundled
from draftwise.models.config import ModelConfig
from draftwise.models.gguf import load_gguf
from draftwise.models.weights import LoadedWeights, checked_weights

CACHE_VERSION = 1
_DONE = "draftwise-cache.json"


def cache_key(label: str, ident: str) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{ident}".encode()).hexdigest()[:16]
    return f"{label}-{digest}"


def load_gguf_cached(
    path: Path, key: str, cache_dir: Path | None, progress: bool, source: str
) -> LoadedWeights:
    folder = bundled.cache_root(cache_dir) / "converted" / key
    if (folder / _DONE).is_file():
        try:
            return _read_cache(folder, source)
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt from the GGUF
            shutil.rmtree(folder, ignore_errors=True)
    loaded = load_gguf(path, progress, source)
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
    return LoadedWeights(cfg, checked_weights(cfg, sd, str(folder)), tok, source)


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
