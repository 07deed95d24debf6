"""Roofline of a loaded model on this machine: how fast one target pass can possibly be,
how fast it is, and so how many tokens a pass can verify for free.

Decoding reads every weight once per pass, so its floor is weight bytes / memory
bandwidth. Verifying k+1 tokens reads the same weights; as long as the pass stays bound
by memory, it costs about the same as one token, and that flat stretch is what
speculation spends. The report measures the pass over 1, 2, 4, 8 and 16 tokens and
names the draft length that maximises expected tokens per second at a few acceptance
rates (`engine/controller.py` does the same online, from live measurements).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from draftwise.verify import expected_tokens

PASS_SIZES = (1, 2, 4, 8, 16)
ALPHAS = (0.5, 0.7, 0.9)


@dataclass
class Roofline:
    weight_bytes: int  # held in memory
    pass_bytes: int  # read by one decode pass
    bandwidth: float  # bytes/s, measured
    pass_seconds: dict[int, float]  # tokens in the pass -> median seconds
    machine: str

    @property
    def floor_seconds(self) -> float:
        return self.pass_bytes / self.bandwidth

    def best_k(self, alpha: float) -> int:
        sizes = sorted(self.pass_seconds)
        return max((n - 1 for n in sizes), key=lambda k: expected_tokens(alpha, k) / self.pass_seconds[k + 1])


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers, plus weights that kernels keep packed outside them."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # tied weights once
    packed = sum(getattr(m, "packed_bytes", 0) for m in model.modules())
    return sum(t.numel() * t.element_size() for t in tensors.values()) + packed


def pass_bytes(model: torch.nn.Module) -> int:
    """Weight bytes one decode pass reads: `weight_bytes` less the embedding table (a pass
    reads only its tokens' rows) unless it is the LM head the pass runs, and less the LM
    head weight when the pass runs its own copy of it (`head_proj`: quantized or packed)."""
    table, head = model.model.embed_tokens.weight, model.head_weight
    unread = {id(table): table}
    if model.head_proj is None:
        unread.pop(id(head), None)  # a tied table is the head this pass runs
    else:
        unread[id(head)] = head
    return weight_bytes(model) - sum(t.numel() * t.element_size() for t in unread.values())


def memory_bandwidth(size_mb: int = 512, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """Bytes/s of a streaming read on `device` (a sum over a buffer much larger than the caches)."""
    x = torch.ones(size_mb * 2**20 // 2, dtype=torch.bfloat16, device=device)
    x.sum()
    best = min(timed(lambda: x.sum(), x.device) for _ in range(repeats))
    return x.numel() * x.element_size() / best


def timed(fn, device: torch.device) -> float:
    """Seconds `fn` takes, the device's queued work finished before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def measure(model, context: int = 128, repeats: int = 5) -> Roofline:
    """Time passes over `PASS_SIZES` tokens after a `context`-token prefix."""
    from draftwise.bench.report import machine_info

    cache = model.new_cache(1, context + max(PASS_SIZES) + 1)
    device = model.device
    prefix = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    model(prefix, torch.arange(context, device=device)[None], cache)
    cache.set_length(0, context)
    seconds = {}
    for n in PASS_SIZES:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)
        pos = (context + torch.arange(n, device=device))[None]
        model(ids, pos, cache)  # warm-up of this shape
        seconds[n] = statistics.median(timed(lambda: model(ids, pos, cache), device) for _ in range(repeats))
    info = machine_info(str(model.dtype).replace("torch.", ""), "")
    machine = info.get("gpu") if device.type == "cuda" else f"{info.get('cpu')}, {info.get('cores')} cores"
    return Roofline(weight_bytes(model), pass_bytes(model), memory_bandwidth(device=device), seconds, machine)


def report(r: Roofline, model_name: str, dtype: str, quantization: str) -> str:
    one = r.pass_seconds[1]
    lines = [
        f"roofline: {model_name} ({dtype}, quantization {quantization}) on {r.machine}",
        f"weights:              {r.weight_bytes / 2**20:,.0f} MiB held, {r.pass_bytes / 2**20:,.0f} MiB read per pass",
        f"memory bandwidth:     {r.bandwidth / 1e9:.1f} GB/s (measured, streaming read)",
        f"floor per token:      {r.floor_seconds * 1e3:.1f} ms ({1 / r.floor_seconds:.1f} tokens/s at best)",
        "pass over n tokens:   " + ", ".join(
            f"{n}: {t * 1e3:.1f} ms ({t / one:.2f}x)" for n, t in sorted(r.pass_seconds.items())),
        f"one-token pass vs floor: {one / r.floor_seconds:.2f}x",
        "best draft length:    " + ", ".join(f"acceptance {a:.1f} -> k={r.best_k(a)}" for a in ALPHAS),
    ]
    return "\n".join(lines)
