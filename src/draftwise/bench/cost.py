"""What speculation saves when you pay for GPU-hours: pure arithmetic, no I/O.

A GPU rented at P dollars an hour that emits T output tokens a second costs
P / (3600 T) dollars a token, so $ per 1M output tokens = 1e6 P / (3600 T). Speculation
raises T on the same GPU, so the price per token (and the GPUs a workload needs) falls by
the same factor. Target forward passes per output token (plain = 1.00) measure the target
compute directly: 0.30 passes a token is 1 / 0.30 = 3.3x less target work.

On a per-token API bill none of this shows: the provider prices per token, so the
saving is the provider's, not yours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SECONDS_PER_HOUR = 3600.0
SECONDS_PER_DAY = 86400.0
HOURS_PER_MONTH = 730.0  # 365 * 24 / 12


def dollars_per_million_tokens(gpu_hour_price: float, tokens_per_second: float) -> float:
    """$2.00/hour at 40 tokens/s -> 13.89; at 100 tokens/s -> 5.56."""
    if tokens_per_second <= 0:
        raise ValueError("tokens_per_second must be positive")
    return gpu_hour_price / (tokens_per_second * SECONDS_PER_HOUR) * 1e6


def speculative_tokens_per_second(tokens_per_second: float, speedup: float) -> float:
    return tokens_per_second * speedup


def saving(before: float, after: float) -> float:
    """The share cut: 13.89 -> 5.56 is 0.60."""
    return 1.0 - after / before if before else 0.0


def compute_cut(passes_per_token: float, plain_passes_per_token: float = 1.0) -> float:
    """How many times less target compute a token takes: 1.00 vs 0.30 passes -> 3.33x."""
    if passes_per_token <= 0:
        raise ValueError("passes_per_token must be positive")
    return plain_passes_per_token / passes_per_token


def gpus_needed(requests_per_day: float, output_tokens_per_request: float, tokens_per_second: float) -> int:
    """Whole GPUs to emit a day's output tokens at `tokens_per_second` each (at least 1)."""
    if tokens_per_second <= 0:
        raise ValueError("tokens_per_second must be positive")
    tokens_per_day = requests_per_day * output_tokens_per_request
    return max(1, math.ceil(tokens_per_day / (tokens_per_second * SECONDS_PER_DAY) - 1e-9))


def monthly_cost(gpus: int, gpu_hour_price: float) -> float:
    return gpus * gpu_hour_price * HOURS_PER_MONTH


@dataclass(frozen=True)
class CostLine:
    """One way of serving a workload (plain or with a speculator)."""

    label: str
    tokens_per_second: float
    dollars_per_million: float
    passes_per_token: float | None
    gpus: int
    monthly: float


@dataclass(frozen=True)
class Workload:
    gpu_hour_price: float
    requests_per_day: float
    output_tokens_per_request: float

    @property
    def tokens_per_day(self) -> float:
        return self.requests_per_day * self.output_tokens_per_request


def cost_line(label: str, work: Workload, tokens_per_second: float, passes_per_token: float | None) -> CostLine:
    gpus = gpus_needed(work.requests_per_day, work.output_tokens_per_request, tokens_per_second)
    return CostLine(label, tokens_per_second, dollars_per_million_tokens(work.gpu_hour_price, tokens_per_second),
                    passes_per_token, gpus, monthly_cost(gpus, work.gpu_hour_price))


def format_table(work: Workload, lines: list[CostLine]) -> str:
    """Plain first, then each speculative line with its saving against plain."""
    base = lines[0]
    out = [
        f"GPU at ${work.gpu_hour_price:.2f}/hour; workload {work.requests_per_day:,.0f} requests/day x "
        f"{work.output_tokens_per_request:,.0f} output tokens = {work.tokens_per_day / 1e6:,.2f}M output tokens/day",
        "",
        f"{'method':<28} {'tokens/s':>9} {'$/1M tokens':>12} {'passes/token':>13} {'GPUs':>5} {'$/month':>11}  saving",
    ]
    for line in lines:
        passes = "-" if line.passes_per_token is None else f"{line.passes_per_token:.2f}"
        if line is base:
            note = "-"
        else:
            cut = saving(base.dollars_per_million, line.dollars_per_million)
            note = f"{cut:.0%} cheaper per token" if cut >= 0 else f"{-cut:.0%} dearer per token"
            if line.passes_per_token and base.passes_per_token:
                note += f", {compute_cut(line.passes_per_token, base.passes_per_token):.1f}x less target compute"
            month = base.monthly - line.monthly
            note += f", ${month:,.0f}/month saved" if month >= 0 else f", ${-month:,.0f}/month more"
        out.append(f"{line.label:<28} {line.tokens_per_second:>9.1f} {line.dollars_per_million:>12.2f} "
                   f"{passes:>13} {line.gpus:>5} {line.monthly:>11,.0f}  {note}")
    out += ["", "Self-hosted, you pay for GPU-hours: more tokens/s per GPU is a lower price per token and fewer GPUs.",
            "On a per-token API bill the price does not move: the provider keeps that saving."]
    return "\n".join(out)
