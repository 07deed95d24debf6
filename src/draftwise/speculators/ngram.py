"""Prompt lookup decoding ("ngram"): copy what followed the last n-gram earlier in the text.

For each request, the last n tokens of prompt + output (n from `prompt_lookup_max` down to
`prompt_lookup_min`) are looked up among the earlier positions of that same text; the
most recent earlier occurrence wins, a longer n before a shorter one, and the tokens that
followed it are proposed as a chain (point mass: no draft probabilities).

When the matched occurrence overlaps the current suffix (a periodic text such as
"ab ab ab"), the tokens after it run into the end of the text; the draft then keeps
copying with the same period, as LZ77 does, instead of stopping short.

Per request we keep, for every n, a dict from n-gram to the position just after its most
recent occurrence (only occurrences followed by at least one token). It is extended
incrementally with committed tokens only, so a step costs
O(new tokens x (max - min + 1)) index updates plus at most (max - min + 1) dict lookups,
independent of the context length. Rejected draft tokens never reach `output_ids`, hence
never reach the index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from draftwise.config import SpeculativeConfig
from draftwise.request import RequestState
from draftwise.speculators.base import Draft, Proposer, register


@dataclass
class _Index:
    """Committed tokens of one request and, per n, n-gram -> position after its last occurrence."""

    tokens: list[int] = field(default_factory=list)
    by_n: dict[int, dict[tuple[int, ...], int]] = field(default_factory=dict)


def _committed(request: RequestState, start: int) -> list[int]:
    """request.all_ids[start:] without concatenating the whole history."""
    n_prompt = len(request.prompt_ids)
    if start >= n_prompt:
        return request.output_ids[start - n_prompt :]
    return request.prompt_ids[start:] + request.output_ids


@register
class NgramProposer(Proposer):
    """Prompt lookup: propose the continuation of the most recent earlier match of the suffix."""

    name = "ngram"

    def __init__(self, min_n: int = 1, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n = min_n
        self.max_n = max_n
        self._state: dict[str, _Index] = {}

    @classmethod
    def from_config(cls, config: SpeculativeConfig, target: Any = None) -> "NgramProposer":
        return cls(min_n=config.prompt_lookup_min, max_n=config.prompt_lookup_max)

    # --- lifecycle -----------------------------------------------------------------------

    def begin(self, request: RequestState) -> None:
        self._state[request.request_id] = _Index(by_n={n: {} for n in range(self.min_n, self.max_n + 1)})
        self._sync(request)

    def on_accept(self, request: RequestState, num_accepted: int) -> None:
        self._sync(request)

    def end(self, request: RequestState) -> None:
        self._state.pop(request.request_id, None)

    def propose(self, requests: Sequence[RequestState], num_tokens: Sequence[int]) -> Draft:
        draft = Draft.empty(len(requests))
        for i, (request, k) in enumerate(zip(requests, num_tokens)):
            if k > 0:
                draft.tokens[i] = self.lookup(self._sync(request), k)
        return draft

    # --- index ---------------------------------------------------------------------------

    def _sync(self, request: RequestState) -> _Index:
        """Bring the request's index up to its committed tokens (created on first sight)."""
        index = self._state.get(request.request_id)
        total = len(request.prompt_ids) + len(request.output_ids)
        if index is None or total < len(index.tokens):  # unknown, or history shrank: rebuild
            index = _Index(by_n={n: {} for n in range(self.min_n, self.max_n + 1)})
            self._state[request.request_id] = index
        if total > len(index.tokens):
            self._extend(index, _committed(request, len(index.tokens)))
        return index

    def _extend(self, index: _Index, new: list[int]) -> None:
        """Append tokens; record every n-gram that is now followed by a token."""
        toks = index.tokens
        old_len = len(toks)
        toks.extend(new)
        # An n-gram ending at position p (exclusive) is indexable once toks[p] exists, i.e.
        # for p in [old_len, len - 1]; p = old_len became followed just now.
        for p in range(max(old_len, 1), len(toks)):
            for n, table in index.by_n.items():
                if p >= n:
                    table[tuple(toks[p - n : p])] = p

    def lookup(self, index: _Index, k: int) -> list[int]:
        """Up to k tokens following the most recent earlier occurrence of the longest suffix."""
        toks = index.tokens
        size = len(toks)
        for n in range(min(self.max_n, size - 1), self.min_n - 1, -1):
            p = index.by_n[n].get(tuple(toks[size - n :]))
            if p is not None:
                period = size - p  # >= 1: the match is strictly earlier than the suffix
                if period >= k:
                    return toks[p : p + k]
                return [toks[p + (j % period)] for j in range(k)]
        return []
