"""Choosing how many target layers a layer_skip draft runs (L), by measurement.

One target pass over a fixed text gives, for a few candidate L, how often the early-exit
argmax equals the full model's (acceptance alpha); the draft cost of L layers relative to
a target pass is taken from parameter counts (decode reads every weight once, so it is
memory bound: cost ~ bytes read). The L with the best expected tokens per unit of time,
(1 - alpha^(k+1)) / (1 - alpha) / (1 + k c_L), wins.
"""

from __future__ import annotations

import torch

from draftwise.models.partial import lm_logits
from draftwise.models.transformer import Transformer
from draftwise.verify import expected_tokens

CALIBRATION_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1905 Albert Einstein published four papers "
    "that changed physics. def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) "
    "+ fibonacci(n - 2)\n\nQuestion: What is the capital of France? Answer: The capital of France is Paris. "
    "To make tea, boil water, add the leaves, and wait three minutes before pouring."
)


# --- calibration ------------------------------------------------------------------------


def candidate_layers(n: int) -> list[int]:
    """L values worth measuring for an n-layer target."""
    if n <= 8:
        return list(range(1, n)) or [1]
    return sorted({max(1, min(n - 1, round(n * f))) for f in (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)})


def relative_cost(model: Transformer, num_layers: int) -> float:
    """Cost of an L-layer draft pass over a full target pass, from weights read."""
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    head = model.head_weight.numel()
    n = len(model.model.layers)
    return (num_layers * per_layer + head) / (n * per_layer + head)


def pick_num_layers(alphas: dict[int, float], costs: dict[int, float], k: int) -> int:
    """The L maximizing expected tokens per unit time: E[tokens | alpha, k] / (1 + k c_L)."""
    return max(sorted(alphas), key=lambda L: expected_tokens(alphas[L], k) / (1.0 + k * costs[L]))


@torch.inference_mode()
def calibrate(model: Transformer, ids: list[int], k: int,
              max_tokens: int = 96) -> dict[int, tuple[float, float, float]]:
    """For each candidate L: (alpha, relative cost, expected speedup) measured on `ids`."""
    ids = ids[:max_tokens]
    t = len(ids)
    cands = candidate_layers(len(model.model.layers))
    cache = model.new_cache(1, t + 1)
    device = model.device
    x = torch.tensor([ids], device=device)  # [1, T]
    out = model(x, torch.arange(t, device=device)[None], cache, hidden_layers=[L - 1 for L in cands])
    full = out.logits[0].argmax(-1)  # [T]
    result = {}
    for L in cands:
        early = lm_logits(model, out.hidden[L - 1][0]).argmax(-1)  # [T]
        alpha = float((early == full).float().mean())
        cost = relative_cost(model, L)
        result[L] = (alpha, cost, expected_tokens(alpha, k) / (1.0 + k * cost))
    return result

