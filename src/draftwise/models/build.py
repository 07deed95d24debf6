"""A runnable model from a reference: the weights (`loading.py`: bundled name, GGUF file or
Hugging Face folder) in the native decoder, on its device and dtype, quantized if asked,
with its CPU projections packed (`packed.py`)."""

from __future__ import annotations

import torch

from draftwise.errors import BadInput
from draftwise.models.transformer import Transformer

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
          "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise BadInput(f"unknown dtype {name!r}; choose one of: bf16, fp32, fp16")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name `parse_dtype` takes for `dtype` (bf16, fp32, fp16)."""
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(ref: str, dtype: str | torch.dtype = "bf16", device: str | None = None, progress: bool = True,
               quantization: str = "none", revision: str | None = None):
    """A bundled name, GGUF file, HF folder or Hub id -> (native model, tokenizer)."""
    from draftwise.models.loading import load_weights
    from draftwise.models.packed import pack
    from draftwise.models.quantize import QUANTIZATIONS, quantize

    if quantization not in QUANTIZATIONS:
        raise BadInput(f"unknown quantization {quantization!r}; choose one of: {', '.join(QUANTIZATIONS)}")

    weights = load_weights(ref, progress=progress, revision=revision)
    with torch.device("meta"):
        model = Transformer(weights.config)
    model.load_state_dict(weights.state_dict, strict=True, assign=True)
    model = model.to(device=device or default_device(), dtype=parse_dtype(dtype))
    try:
        model = quantize(model.eval(), quantization)
    except ValueError as e:  # a setting this model or machine cannot take, with its reason
        raise BadInput(f"--quantization {quantization}: {e}") from None
    return pack(model), weights.tokenizer


def load_tokenizer(ref: str, revision: str | None = None):
    """A tokenizer on its own: a folder, or a Hub id (the standard cache, HF_HUB_OFFLINE honoured)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    local = Path(ref).expanduser()
    try:
        if local.exists():
            return AutoTokenizer.from_pretrained(str(local), local_files_only=True)
        return AutoTokenizer.from_pretrained(ref, revision=revision)
    except Exception as e:  # noqa: BLE001 - transformers and the hub raise many kinds
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"tokenizer {ref!r} could not be loaded: {first}") from None
