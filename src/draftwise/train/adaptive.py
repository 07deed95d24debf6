"""Offline catch-up of the adaptive speculator (`draftwise train adaptive --state DIR`).

A serving process learns from its traffic only in idle time, and a `draftwise generate`
call has none: its requests still go into the state's traffic store
(`speculators/adaptive/state.py`). This trains the state's head on that stored traffic,
with the learner's own objective and optimizer settings, until a step or time budget,
saving the head every `SAVE_EVERY` steps and at the end (an interrupted run keeps what it
trained; the next run goes on from there). The next process that uses the state serves
the trained head.

A state holds little traffic (the store is bounded: on the 1.5B, 55 sequences, 16k
tokens), and a night's budget is a hundred passes over it: the head would learn those
sequences by heart and draft worse on new ones. So one stored sequence in `HOLD_OUT` is
held out (never trained on); every `EVAL_EVERY` steps the head's loss on them is
measured, the best head so far kept, and after `PATIENCE` measures without a better one
training stops ("held-out") with the best head restored. A state with fewer than
`MIN_SEQUENCES` sequences trains on all of them, with no such check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm import tqdm

from draftwise.errors import BadInput

SAVE_EVERY = 50  # training steps between saves of the state
HOLD_OUT = 10  # one stored sequence in this many is held out to catch overfitting
MIN_SEQUENCES = 5  # fewer stored sequences: no hold-out
EVAL_EVERY = 25  # training steps between two measures of the held-out loss
PATIENCE = 4  # measures without a lower held-out loss before training stops


@dataclass
class CatchUp:
    steps: int  # training steps this run
    total_steps: int  # the state's steps in all
    first_loss: float | None
    last_loss: float | None
    seconds: float
    traffic_tokens: int
    stopped_by: str  # "steps", "minutes", "held-out", "no traffic" or "interrupted"
    held_out: int = 0  # stored sequences held out
    held_out_first: float | None = None  # their loss before this run's training
    held_out_best: float | None = None  # ... with the head kept (the best measured)


def split(items: list) -> tuple[list, list]:
    """(trained on, held out): every `HOLD_OUT`-th sequence, from the middle of the first
    `HOLD_OUT`, held out; none below `MIN_SEQUENCES`."""
    if len(items) < MIN_SEQUENCES:
        return items, []
    first = min(HOLD_OUT // 2, len(items) - 1)
    return [it for i, it in enumerate(items) if i % HOLD_OUT != first], items[first::HOLD_OUT]


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
    _, held = split(learner.buffer.snapshot())
    learner.held_out = frozenset(id(it) for it in held)
    deadline = None if max_minutes is None else time.monotonic() + 60.0 * max_minutes
    start, first, done, stopped = time.perf_counter(), None, 0, "steps"
    held_first = best = held_now = learner.loss_on(held) if held else None
    best_weights, since_best = learner.weights() if best is not None else None, 0
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
            if best is not None and done % EVAL_EVERY == 0:
                now = learner.loss_on(held)
                held_now = now if now is not None else held_now
                if now is not None and now < best:
                    best, best_weights, since_best = now, learner.weights(), 0
                else:
                    since_best += 1
                    if since_best >= PATIENCE:
                        stopped = "held-out"
                        break
            bar.set_postfix(loss=f"{loss:.3f}" if loss is not None else "-",  # held out: the last measure, the best
                            **({"held_out": f"{held_now:.3f}", "best": f"{best:.3f}"} if best is not None else {}))
            if done % SAVE_EVERY == 0:
                proposer.save_state()
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        bar.close()
        restored = best is not None and since_best > 0
        if restored:  # the last measures were worse: serve the best head
            learner.restore(best_weights)
        learner.held_out = frozenset()
        proposer.save_state(head=restored)
    return CatchUp(done, learner.steps, first, learner.last_loss, time.perf_counter() - start, tokens, stopped,
                   len(held), held_first, best)
