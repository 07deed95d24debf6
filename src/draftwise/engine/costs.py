"""Measured step costs: running averages by size, read between and beyond the sizes seen.

Shared by the chain controller (engine/controller.py) and the tree controller
(engine/tree_controller.py); how unmeasured sizes are read is explained in
engine/controller.py's docstring.
"""

from __future__ import annotations

import bisect

MAX_EXPLORE_GAP = 256  # steps between explorations at most, while speculation is off


class Curve:
    """Running averages of a cost by size, read between and beyond the sizes measured."""

    def __init__(self, smoothing: float = 0.2) -> None:
        self.smoothing = smoothing
        self.values: dict[int, float] = {}  # size -> seconds
        self.seen: dict[int, int] = {}  # size -> times measured

    def observe(self, size: int, seconds: float) -> None:
        n = self.seen.get(size, 0)
        self.seen[size] = n + 1
        old = self.values.get(size)
        self.values[size] = seconds if n < 2 else (1 - self.smoothing) * old + self.smoothing * seconds

    def at(self, size: int) -> float | None:
        """Seconds at `size`; None before any measurement."""
        v = self.values
        if not v:
            return None
        if size in v:
            return v[size]
        sizes = sorted(v)
        i = bisect.bisect_left(sizes, size)
        if i == 0:  # below what was seen: optimistic, so it gets measured
            return v[sizes[0]] * size / sizes[0]
        if i == len(sizes):  # beyond what was seen: the slope of the two largest sizes
            big = sizes[-1]
            if len(sizes) == 1:
                return v[big]
            prev = sizes[-2]
            slope = max(0.0, (v[big] - v[prev]) / (big - prev))
            return v[big] + slope * (size - big)
        lo, hi = sizes[i - 1], sizes[i]
        w = (size - lo) / (hi - lo)
        return (1 - w) * v[lo] + w * v[hi]


class CostModel:
    """Measured step costs (seconds): target passes by tokens in the pass, draft passes by batch."""

    def __init__(self, smoothing: float = 0.2) -> None:
        self.passes = Curve(smoothing)
        # drafting seconds per draft pass; a step that drafts k tokens makes k + 1 passes
        # (first catching the draft up on the tokens committed last step, then k positions)
        self.drafts = Curve(smoothing)

    def observe_pass(self, tokens: int, seconds: float) -> None:
        self.passes.observe(tokens, seconds)

    def observe_draft(self, batch: int, positions: int, seconds: float) -> None:
        if positions > 0:
            self.drafts.observe(batch, seconds / (positions + 1))

    def pass_cost(self, tokens: int) -> float | None:
        """Seconds of a target pass over `tokens` tokens; None before any measurement."""
        return self.passes.at(tokens)

    def draft_cost(self, batch: int, k: int) -> float:
        """Seconds of drafting k tokens for `batch` requests (0 before any measurement)."""
        per_pass = self.drafts.at(batch)
        return (per_pass or 0.0) * (k + 1) if k else 0.0
