"""What a benchmark run is set to, and what one generation gave, whichever engine ran it
(shared by the runner and the peer engines)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from draftwise.sampling import SamplingParams


@dataclass
class BenchSettings:
    model: str = "<in-memory model>"
    dtype: str = "bf16"
    device: str = "cpu"
    max_tokens: int = 1024
    temperature: float = 0.0
    sampling: str = "coupled"  # coupled | rejection (SamplingParams.sampling), when temperature > 0
    chat_template: bool = True
    warmup: bool = True
    dataset: str = ""
    categories: list[str] | None = None
    limit: int | None = None
    quantization: str = "none"

    def fingerprint(self) -> dict[str, Any]:
        """The settings a record's numbers depend on (a resumed run must match them)."""
        keys = ("model", "dtype", "device", "max_tokens", "temperature", "sampling", "chat_template", "quantization")
        return {k: v for k, v in asdict(self).items() if k in keys}


@dataclass
class Generation:
    """What one generation produced, whichever engine ran it."""

    token_ids: list[int]
    text: str
    seconds: float
    finish_reason: str | None = None
    stats: dict[str, Any] | None = None  # raw speculation counters (draftwise only)
    extra: dict[str, Any] = field(default_factory=dict)


Generate = Callable[[list[int], list[dict[str, str]], SamplingParams], Generation]
