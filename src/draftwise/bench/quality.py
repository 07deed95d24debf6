"""What quantization costs in accuracy: perplexity on a fixed text and next-token agreement.

Quantization changes the model, so its cost is measured, not assumed: each setting is
loaded fresh, the text is scored teacher-forced (every position predicts the next token),
and the report gives the perplexity and how often the quantized model's most likely next
token equals the unquantized model's. The default text (`bench/data/quality.txt`) is a
small Python module with prose around it, written for this purpose; `--text FILE` takes any.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from draftwise.bench.roofline import weight_bytes
from draftwise.errors import BadInput

CHUNK = 256  # tokens per pass while scoring


@dataclass
class Quality:
    quantization: str
    weight_bytes: int
    perplexity: float
    agreement: float  # next-token argmax equal to the unquantized model's (1.0 for "none")


def default_text() -> str:
    return resources.files("draftwise.bench").joinpath("data/quality.txt").read_text()


def read_text(path: str | None) -> str:
    if path is None:
        return default_text()
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read the text {path}: {e}") from None
    if not text.strip():
        raise BadInput(f"the text {path} is empty")
    return text


@torch.inference_mode()
def score(model, ids: list[int]) -> tuple[float, torch.Tensor]:
    """(mean negative log-likelihood of ids[1:], argmax prediction at each position but the last)."""
    n = len(ids)
    cache = model.new_cache(1, n)
    tokens = torch.tensor([ids], device=model.device)
    nll, preds = 0.0, []
    for start in range(0, n - 1, CHUNK):
        end = min(start + CHUNK, n - 1)
        logits = model(tokens[:, start:end], torch.arange(start, end, device=model.device)[None], cache).logits[0]
        cache.set_length(0, end)
        lp = torch.log_softmax(logits.float(), -1)
        nll -= lp.gather(1, tokens[0, start + 1 : end + 1, None]).sum().item()
        preds.append(lp.argmax(-1).cpu())
    return nll / (n - 1), torch.cat(preds)


def measure(load, methods: list[str], ids: list[int]) -> list[Quality]:
    """`load(method)` -> model; "none" is always measured first, as the reference."""
    rows, reference = [], None
    for method in ["none", *[m for m in methods if m != "none"]]:
        model = load(method)
        nll, preds = score(model, ids)
        if reference is None:
            reference = preds
        rows.append(Quality(method, weight_bytes(model), math.exp(nll), (preds == reference).float().mean().item()))
        del model
    return rows


def report(rows: list[Quality], model_name: str, dtype: str, tokens: int) -> str:
    lines = [f"quantization quality: {model_name} ({dtype}), {tokens} tokens of text, teacher-forced",
             "| quantization | weights MiB | perplexity | next-token agreement with none |",
             "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.quantization} | {r.weight_bytes / 2**20:,.0f} | {r.perplexity:.3f} | {r.agreement:.1%} |")
    return "\n".join(lines)
