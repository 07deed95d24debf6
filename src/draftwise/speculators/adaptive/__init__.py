"""The adaptive family: a speculator made of speculators, a head learned online, its saved state.

The front door: everything outside this folder (the registry, `train/`, `server/`,
`commands/`) imports from here, never from the modules below.

- `proposer.py`: the `adaptive` method (registered): its parts (a static speculator, the
  learned EAGLE head, the suffix cache) and how it forwards the lifecycle to them;
- `control.py`: the `Arbiter`, which picks the part that drafts per request and step;
- `online.py`: the online learner (`OnlineLearner`) and its replay buffer of served traffic;
- `state.py`: what it learned, on disk (`--adaptive-state DIR`), across restarts.

It builds on the EAGLE family through that family's front door (`speculators/eagle`).
"""

from __future__ import annotations

from draftwise.speculators.adaptive.control import Arbiter, saved_window_tokens
from draftwise.speculators.adaptive.online import LearnerSettings, OnlineLearner, ReplayBuffer, Stored
from draftwise.speculators.adaptive.proposer import AdaptiveProposer, new_head, shipped_head_for
from draftwise.speculators.adaptive.state import STATE, TRAFFIC, AdaptiveState, read_state

__all__ = ["STATE", "TRAFFIC", "AdaptiveProposer", "AdaptiveState", "Arbiter", "LearnerSettings", "OnlineLearner",
           "ReplayBuffer", "Stored", "new_head", "read_state", "saved_window_tokens", "shipped_head_for"]
