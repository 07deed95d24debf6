"""Offline catch-up of the adaptive speculator (`draftwise train adaptive --state DIR`).

A serving process learns from its traffic only in idle time, and a `draftwise generate`
call has none: its requests still go into the state's traffic store
(`speculators/adaptive/state.py`). This trains the state's head on that stored traffic,
with the learner's own objective and optimizer settings, until a step or time budget,
saving the head every `SAVE_EVERY` steps and at the end (an interrupted run keeps what it
trained; the next run goes on from there). The next process that uses the state serves
the trained head.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm import tqdm

from draftwise.errors import BadInput

SAVE_EVERY = 50  # training steps between saves of the state


@dataclass
class CatchUp:
    steps: int  # training steps this run
    total_steps: int  # the state's steps in all
    first_loss: float | None
    last_loss: float | None
    seconds: float
    traffic_tokens: int
    stopped_by: str  # "steps", "minutes", "no traffic" or "interrupted"


def train_adaptive(proposer, max_steps: int | None, max_minutes: float | None, progress: bool = True) -> CatchUp:
    """Train `proposer`'s learner (an `AdaptiveProposer` with a state folder) on its stored
    traffic in the calling thread, its background trainer held; save as it goes."""
    learner = proposer.learner
    if proposer.state is None or learner is None:
        raise BadInput("train adaptive needs an adaptive speculator with a state folder and its learner enabled")
    if max_steps is not None and max_steps < 1 or max_minutes is not None and max_minutes <= 0:
        raise BadInput("--max-steps and --max-minutes must be positive")
    tokens = learner.buffer.tokens
    if tokens < learner.settings.min_tokens or not learner.buffer.snapshot():
        return CatchUp(0, learner.steps, None, None, 0.0, tokens, "no traffic")
    learner.pause()  # the background trainer would compete for the same weights and cores
    learner.settings.swap_every = 10**9  # no drafting copies: nothing serves while this runs
    deadline = None if max_minutes is None else time.monotonic() + 60.0 * max_minutes
    start, first, done, stopped = time.perf_counter(), None, 0, "steps"
    bar = tqdm(total=max_steps, unit="step", disable=not progress, dynamic_ncols=True,
               desc="train adaptive")
    try:
        while max_steps is None or done < max_steps:
            if deadline is not None and time.monotonic() >= deadline:
                stopped = "minutes"
                break
            loss = learner.train_step()
            done += 1
            first = loss if first is None else first
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}" if loss is not None else "-")
            if done % SAVE_EVERY == 0:
                proposer.save_state()
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        bar.close()
        proposer.save_state()
    return CatchUp(done, learner.steps, first, learner.last_loss, time.perf_counter() - start, tokens, stopped)
