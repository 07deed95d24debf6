"""What `LLM.generate` returns, in vLLM's shape: a `RequestOutput` per prompt holding one
`CompletionOutput` per sample (`SamplingParams.n`), with vLLM's field names.

`CompletionOutput.logprobs` is vLLM's shape too: per output token a dict
{token id: Logprob(logprob, rank, decoded_token)} holding the chosen token and the most
likely alternatives. draftwise's own shortcuts sit beside them on `RequestOutput`: `text`,
`token_ids`, `finish_reason`, `stats` (the speculation counters) and `logprobs` (as
`sampling.TokenLogprob`) of the first sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from draftwise.request import RequestState
from draftwise.sampling import TokenLogprob


@dataclass
class Logprob:
    """One token's log-probability at a position, its rank there (1 = most likely), its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One sample of a prompt (vLLM's fields, plus draftwise's `stats` and, from `LLM.chat`
    with tools, `tool_calls`)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None  # sum of the tokens' logprobs, when logprobs were asked for
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None  # "stop" or "length"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it; None for EOS / length
    stats: dict[str, Any] = field(default_factory=dict)
    tool_calls: list[dict[str, Any]] | None = None  # LLM.chat with tools: the calls parsed from text

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """What one prompt gave: `outputs` holds its `SamplingParams.n` samples (as vLLM's);
    `text`, `token_ids`, `finish_reason`, `stats` and `logprobs` (`TokenLogprob`s) are the
    first sample's, draftwise's shortcuts."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stats: dict[str, Any] = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None  # per output token, when SamplingParams.logprobs is set
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


def vllm_logprobs(items: list[TokenLogprob], decode: Callable[[int], str]) -> list[dict[int, Logprob]]:
    """draftwise's TokenLogprobs as vLLM's per-position dicts (the chosen token first)."""
    out = []
    for item in items:
        position = {item.token: Logprob(item.logprob, item.rank, decode(item.token))}
        for rank, (token, logprob) in enumerate(item.top, start=1):
            position.setdefault(token, Logprob(logprob, rank, decode(token)))
        out.append(position)
    return out


def completion(index: int, req: RequestState, text: str, stats: dict[str, Any],
               decode: Callable[[int], str]) -> CompletionOutput:
    """The CompletionOutput of a finished request."""
    asked = req.params.logprobs is not None
    items = list(req.output_logprobs) if asked else None
    return CompletionOutput(
        index, text, list(req.output_ids),
        cumulative_logprob=sum(x.logprob for x in items) if items is not None else None,
        logprobs=vllm_logprobs(items, decode) if items is not None else None,
        finish_reason=req.finish_reason, stop_reason=req.stop_reason, stats=stats)
