"""Per-request state shared by the engine and the proposers.

A `RequestState` is what a proposer sees of a request: its token history (prompt and
output so far), its sampling settings and the cache row it lives in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from draftwise.constraints.matcher import Matcher
from draftwise.metrics import SpecStats
from draftwise.sampling import SamplingParams, TokenLogprob, coupled_pick, position_noise, sample


@dataclass
class RequestState:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    row: int = -1  # row of the batch KV cache, -1 while not scheduled
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None  # per-request randomness (seeded when seed given)
    noise_seed: int = 0  # key of the position noise (sampling="coupled"): the seed, else drawn at admission
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS, stop token or string) or "length"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it (None: EOS, length)
    max_tokens: int = 0  # params.max_tokens, or the room left in the context window when that is None
    banned: list[int] = field(default_factory=list)  # ids refused before params.min_tokens (EOS, stop tokens)
    stop_text: str | None = None  # text up to (not including) a matched stop string
    stats: SpecStats = field(default_factory=SpecStats)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)  # when params.logprobs is set
    constraint: Matcher | None = None  # the grammar state of params.structured_outputs (committed tokens only)
    _noise: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)  # (position, vocab) -> its noise

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def draw(self, q: torch.Tensor, ahead: int = 0) -> int:
        """A draft token from q [vocab] for output position len(output_ids) + ahead: the
        argmax when greedy; with coupled sampling the one the position's noise picks (so a
        draft that agrees with the target proposes the very token the target will commit);
        else a draw from the request's generator."""
        if self.params.greedy:
            return int(q.argmax())
        if self.params.coupled:
            position = len(self.output_ids) + ahead
            return coupled_pick(q, self.noise_seed, position, self.noise(position, q.shape[-1]))
        return int(sample(q[None], self.generator)[0])

    def noise(self, position: int, vocab: int) -> torch.Tensor:
        """The position noise of output `position` (`sampling.position_noise`), computed once
        for the drafter and the verifier alike; positions already committed are dropped."""
        key = (position, vocab)
        if key not in self._noise:
            done = len(self.output_ids)
            for old in [k for k in self._noise if k[0] < done]:
                del self._noise[old]
            self._noise[key] = position_noise(self.noise_seed, position, vocab)
        return self._noise[key]
