"""Speculation metrics: per request and in total.

Mean accepted length counts the bonus (or recovered) token, so plain decoding is 1.00;
target passes per output token is its inverse view (plain = 1.00, lower is better).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    target_passes: int = 0  # target forward passes this request took part in (prefill included)
    output_tokens: int = 0
    drafts: int = 0  # steps that verified a non-empty draft
    draft_tokens: int = 0
    accepted_tokens: int = 0
    rejections: int = 0  # drafts cut short by a rejected token (the rest were accepted whole)
    accepted_per_position: list[int] = field(default_factory=list)  # [k]: drafts accepted at depth j
    drafted_per_position: list[int] = field(default_factory=list)  # [k]: drafts that reached depth j
    rejected_per_position: list[int] = field(default_factory=list)  # [k]: drafts cut short at depth j
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    num_speculative_tokens: list[int] = field(default_factory=list)  # draft length chosen per step
    drafted_by: dict[str, int] = field(default_factory=dict)  # composite speculators: steps each part drafted
    forced_drafted: int = 0  # draft tokens a constraint forced (free: no speculator drafted them)
    forced_tokens: int = 0  # of those, accepted (committed without any speculator's guess)

    def observe_draft(self, num_draft: int, num_accepted: int) -> None:
        if num_draft == 0:
            return
        self.drafts += 1
        self.draft_tokens += num_draft
        self.accepted_tokens += num_accepted
        self.rejections += num_accepted < num_draft
        for store, n in ((self.drafted_per_position, num_draft), (self.accepted_per_position, num_accepted)):
            if len(store) < n:
                store.extend([0] * (n - len(store)))
            for j in range(n):
                store[j] += 1
        if num_accepted < num_draft:
            rejected = self.rejected_per_position
            rejected.extend([0] * (num_accepted + 1 - len(rejected)))
            rejected[num_accepted] += 1

    def merge(self, other: "SpecStats") -> None:
        for name in ("target_passes", "output_tokens", "drafts", "draft_tokens", "accepted_tokens", "rejections",
                     "forced_drafted", "forced_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.draft_seconds += other.draft_seconds
        self.verify_seconds += other.verify_seconds
        for mine, theirs in ((self.accepted_per_position, other.accepted_per_position),
                             (self.drafted_per_position, other.drafted_per_position),
                             (self.rejected_per_position, other.rejected_per_position)):
            if len(mine) < len(theirs):
                mine.extend([0] * (len(theirs) - len(mine)))
            for j, n in enumerate(theirs):
                mine[j] += n
        self.num_speculative_tokens.extend(other.num_speculative_tokens)
        for part, n in other.drafted_by.items():
            self.drafted_by[part] = self.drafted_by.get(part, 0) + n

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per verifying pass, bonus included (plain decoding = 1.00)."""
        decode_passes = self.target_passes - 1 if self.target_passes else 0  # prefill emits one token
        return (self.output_tokens - 1) / decode_passes if decode_passes > 0 else 1.0

    @property
    def passes_per_token(self) -> float:
        return self.target_passes / self.output_tokens if self.output_tokens else 0.0

    @property
    def draft_time_share(self) -> float:
        total = self.draft_seconds + self.verify_seconds
        return self.draft_seconds / total if total else 0.0

    def to_dict(self) -> dict:
        per_pos = [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]
        extra = {"drafted_by": dict(self.drafted_by)} if self.drafted_by else {}
        if self.forced_drafted:
            extra["forced_tokens"] = self.forced_tokens
            extra["forced_drafted"] = self.forced_drafted
        return {
            "output_tokens": self.output_tokens,
            "target_passes": self.target_passes,
            "target_passes_per_token": round(self.passes_per_token, 4),
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "drafts": self.drafts,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "acceptance_per_position": [round(x, 4) for x in per_pos],
            "draft_time_share": round(self.draft_time_share, 4),
            "mean_num_speculative_tokens": round(
                sum(self.num_speculative_tokens) / len(self.num_speculative_tokens), 3
            ) if self.num_speculative_tokens else 0.0,
            **extra,
        }
