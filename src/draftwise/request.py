"""Per-request state shared by the engine and the proposers.

A `RequestState` is what a proposer sees of a request: its token history (prompt and
output so far), its sampling settings and the cache row it lives in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from draftwise.engine.metrics import SpecStats
from draftwise.sampling import SamplingParams, TokenLogprob


@dataclass
class RequestState:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    row: int = -1  # row of the batch KV cache, -1 while not scheduled
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None  # per-request randomness (seeded when seed given)
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS, stop token or string) or "length"
    stop_text: str | None = None  # text up to (not including) a matched stop string
    stats: SpecStats = field(default_factory=SpecStats)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)  # when params.logprobs is set

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids
