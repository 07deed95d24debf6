"""Online learning of an EAGLE head from the traffic it serves: a replay buffer and a trainer.

The adaptive speculator (`adaptive/proposer.py`) hands every finished request to the
`ReplayBuffer`: its tokens (prompt and output) and the target's hidden states of those
tokens (the head's feature layers and the last layer, whose LM-head distribution is the
soft label), exactly what `draftwise train eagle` distils offline. The buffer keeps the
most recent `buffer_tokens` tokens.

The `OnlineLearner` trains its own fp32 copy of the head with the offline objective
(`eagle/loss.py`, training-time test included) on windows drawn from the buffer, newest
sequences most often, in a thread of its own, never the engine's:

- duty cycle: while the engine works, at most one training step per `train_every`
  engine steps (the engine `tick`s the learner once per step), and after a step of d
  seconds a rest of d (1 - share) / share, so training takes at most `train_share` of
  the wall time (`train_share` 0: never while it works); while the engine is idle (it
  holds no request, `engine_idle`, and no step ended for `idle_after` seconds), freely;
- cores: the thread sets its own intra-op thread count (`train_threads`; torch keeps
  that setting per thread, so the engine's passes keep theirs), on Linux the lowest CPU
  priority (nice 19, this thread only), and releases its OpenMP workers after each step
  (kernels/openmp.py: a second pool slows every engine pass on few cores);
- arrivals (`interrupt`, from the engine's `add_request`): learning only while idle, the
  step in flight stops at its next safe point, so a request that arrives mid-step does not
  share the cores (nor the interpreter) with the rest of it: in forward or backward (safe
  points before and after each head module, and between the pieces of the objective's
  LM-head parts: at most 64-68 ms apart in a steady step on the 1.5B, one thread) the
  step is given up with the head unchanged; in the update, which runs parameter by
  parameter (one AdamW each: the same update), or while the drafting copy is built, one
  projection at a time (the LM head's packing, ~300 ms, is one piece), the rest is done
  first at the next idle time (on the 1.5B, 2 cores, the head's whole update took 130 ms
  and its drafting copy 440 ms at once);
- swap: every `swap_every` steps the trainer builds a drafting copy (bf16 / the target's
  kernels, `with_kernels`) *in its own thread* and leaves it in `ready`; the speculator
  takes it between engine steps, which costs one reference assignment (under a lock of
  its own: the engine never waits for the lock the trainer holds through a step). A new
  head only changes which tokens are proposed; verification keeps the output the
  target's own.
- failure: any exception (out of memory included) switches the learner off with the
  reason in `error`; serving goes on with the other speculators.
- shared (`share()`, Ray Serve replicas: server/ray_learner.py): the learner trains no
  more itself; its buffer hands each finished sequence to an outbox (`take_examples`)
  that one learner for all replicas drains, built from this one's `spec`; that learner's
  answers come back through `receive`, its weights through `adopt`, which builds the
  drafting copy (in the caller's thread) and leaves it in `ready` as a local training
  step would.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import random
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from draftwise.kernels.openmp import release_thread_pool
from draftwise.speculators.eagle import (Batch, EagleConfig, EagleHead, EagleObjective, safe_point_in_backward,
                                         with_kernels)

log = logging.getLogger("draftwise.adaptive")


@dataclass
class Stored:
    ids: torch.Tensor  # [n+1] tokens 0..n
    feats: torch.Tensor  # [n, len(layers) * H] bf16 target states of tokens 0..n-1
    prompt_len: int

    def window(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The pairs `start`.. (at most `size`) as (ids, feats, prompt_len), for `Batch.of_windows`."""
        m = min(size, self.feats.shape[0] - start)
        return self.ids[start: start + m + 1], self.feats[start: start + m], self.prompt_len - start


class ReplayBuffer:
    """The most recent sequences, at most `max_tokens` feature rows in all (thread-safe)."""

    def __init__(self, max_tokens: int, max_len: int) -> None:
        self.max_tokens, self.max_len = max_tokens, max_len
        self.items: deque[Stored] = deque()
        self.tokens = 0
        self.outbox: deque[Stored] | None = None  # set: sequences go there (a shared learner), not here
        self._lock = threading.Lock()

    def add(self, ids: list[int], feats: torch.Tensor, prompt_len: int) -> None:
        n = min(feats.shape[0], len(ids) - 1, self.max_tokens)
        if n < 2:
            return
        # a sequence longer than the buffer keeps its newest part
        start = feats.shape[0] - n
        item = Stored(torch.tensor(ids[start: start + n + 1]), feats[start: start + n].to(torch.bfloat16),
                         prompt_len - start)
        if self.outbox is not None:
            self.outbox.append(item)
            return
        self.put(item)

    def put(self, item: Stored) -> None:
        """Keep `item`, dropping the oldest sequences beyond `max_tokens`."""
        with self._lock:
            self.items.append(item)
            self.tokens += item.feats.shape[0]
            while self.tokens > self.max_tokens and len(self.items) > 1:
                self.tokens -= self.items.popleft().feats.shape[0]

    def snapshot(self) -> list[Stored]:
        """The sequences now held, oldest first (a consistent copy: stored tensors never change)."""
        with self._lock:
            return list(self.items)

    def sample(self, batch_size: int, rng: random.Random, skip: frozenset[int] = frozenset()) -> Batch | None:
        """A batch of windows (at most `max_len` pairs each), newer sequences more often
        (weight = 1 + position in the buffer), leaving out the sequences whose `id` is in
        `skip` (held out); None when no sequence is left."""
        with self._lock:
            items = [it for it in self.items if id(it) not in skip]
        if not items:
            return None
        chosen = rng.choices(items, weights=range(1, len(items) + 1), k=batch_size)
        windows = [it.window(rng.randrange(0, max(1, it.feats.shape[0] - self.max_len + 1)), self.max_len)
                   for it in chosen]
        return Batch.of_windows(windows)


@dataclass
class LearnerSettings:
    train_threads: int = 1
    train_every: int = 2
    min_tokens: int = 64
    batch_size: int = 4
    lr: float = 3e-5
    warmup: int = 20
    ttt_steps: int = 2
    swap_every: int = 4
    grad_clip: float = 1.0
    seed: int = 0
    train_share: float = 0.1  # at most this share of wall time training while the engine works
    idle_after: float | None = 1.0  # seconds without an engine step after which training runs anyway (None: never)
    # windows per forward and backward (gradients add up over the step's batch); None: the whole
    # batch. One window at a time did not shorten the wait of a request arriving mid-step on
    # the 1.5B (docs/results.md), so it is not the default.
    micro_batch: int | None = None


def lower_this_thread() -> bool:
    """Give the calling thread the lowest CPU priority (nice 19; Linux sets it per thread),
    so that a request arriving during a training step gets the cores at once and the step
    goes on in what the engine leaves. False where the platform cannot."""
    if not sys.platform.startswith("linux"):  # elsewhere the call would take the whole process down
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:
        return False
    return True


class StepInterrupted(Exception):
    """Raised at a safe point of a training step when a request arrived (`OnlineLearner.interrupt`)."""


class OnlineLearner:
    """Trains a copy of `head` on `buffer` in a background thread (see the module docstring)."""

    def __init__(self, head: EagleHead, target, data_layers: list[int], buffer: ReplayBuffer,
                 settings: LearnerSettings, quantization: str = "none") -> None:
        self.target, self.buffer, self.settings = target, buffer, settings
        self.data_layers = list(data_layers)
        self.quantization = quantization
        self.draft_dtype = target.dtype
        self.head = copy.deepcopy(head).to(device=target.device, dtype=torch.float32).train()
        self.params = [p for p in self.head.parameters() if p.requires_grad]
        self.objective = EagleObjective(self.head, target, data_layers, settings.ttt_steps, between=self._safe_point)
        # one optimizer per parameter (the same AdamW update): an update can stop between two
        # parameters when a request arrives. Fused: one pass over each tensor (on the 1.5B's
        # head, 2 cores, the whole update took 130 ms unfused; its LM head alone 65 ms, fused 9)
        fused = self.head.device.type in ("cpu", "cuda")
        self.opts = [torch.optim.AdamW([p], lr=settings.lr, weight_decay=0.0, betas=(0.9, 0.95), fused=fused)
                     for p in self.params]
        self._update_from: int | None = None  # an update cut short: the next parameter to update
        self._copy_due = False  # a drafting copy is due (`swap_every`) but not built yet
        self.steps = 0  # training steps, carried over a resumed state
        self._fresh_steps = 0  # steps of this optimizer (the warm-up restarts with it)
        self.swaps_made = 0
        self.last_loss: float | None = None
        self.held_out: frozenset[int] = frozenset()  # `id`s of stored sequences training leaves out
        self.error: str | None = None
        self.thread_ids: set[int] = set()  # threads training ran on (tests check it is not the engine's)
        self.ready: EagleHead | None = None  # a drafting copy waiting to be swapped in
        self.on_swap_made = None  # callback(learner) in the trainer thread after each drafting copy
        self.busy = False  # a training step is running (the engine then leaves it its cores)
        self.low_priority = False  # the trainer thread runs at the lowest CPU priority (`lower_this_thread`)
        self._tick = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards `head` between training steps and snapshots
        # guards `ready` only: the engine's `take_ready` must never wait for the head's lock,
        # which the trainer holds through a forward and backward (a request that arrived
        # mid-step waited there for the trainer's next safe point)
        self._ready_lock = threading.Lock()
        self._paused = threading.Event()  # set: no training step may start (pause / resume)
        self._interrupt = threading.Event()  # set: a request arrived; the step in flight stops (idle-only)
        self._requests = threading.Event()  # set: the engine holds requests (from an arrival until `engine_idle`)
        self.interrupted = 0  # training steps given up for a request that arrived
        self._gate = threading.Lock()  # held by the trainer through each step: pause waits on it
        self._rng = random.Random(settings.seed)
        self._thread: threading.Thread | None = None
        self._ticks = 0
        self.shared = False  # trained elsewhere (share / adopt)
        self.shared_buffer_tokens = 0  # the shared learner's buffer, as last reported

    @classmethod
    def from_spec(cls, spec: dict, target, **settings) -> "OnlineLearner":
        """The learner `spec` describes (`OnlineLearner.spec`) for `target`, its settings
        overridden by `settings` (the shared learner publishes weights on its own clock)."""
        head = EagleHead(EagleConfig(**spec["head_config"]))
        head.load_state_dict(spec["head_state"])
        learner = cls(head, target, spec["data_layers"], ReplayBuffer(spec["buffer_tokens"], spec["max_len"]),
                      LearnerSettings(**{**spec["settings"], **settings}))
        learner.steps = spec["steps"]
        return learner

    def spec(self) -> dict:
        """What builds the same learner elsewhere (`from_spec`): the head (its config and
        weights), the data layers, the settings, the buffer's bounds and the steps so far."""
        head = self.snapshot()
        return {"head_config": head.config.model_dump(), "head_state": head.state_dict(),
                "data_layers": list(self.data_layers), "settings": dataclasses.asdict(self.settings),
                "buffer_tokens": self.buffer.max_tokens, "max_len": self.buffer.max_len, "steps": self.steps}

    # --- the engine's side --------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None and not self.shared:
            self._thread = threading.Thread(target=self._run, name="draftwise-learner", daemon=True)
            self._thread.start()

    def tick(self) -> None:
        """One engine step happened: every `train_every` of them allow one training step."""
        self._ticks += 1
        if self._ticks % self.settings.train_every == 0:
            self._tick.set()

    def take_ready(self) -> EagleHead | None:
        """The newest drafting copy, once (None when there is none since the last call)."""
        with self._ready_lock:
            head, self.ready = self.ready, None
        return head

    def interrupt(self) -> None:
        """A request arrived. Learning only while idle (`train_share` <= 0), the step in
        flight stops at its next safe point (a module of the head about to run forward, a
        gradient of its parameters computed) without updating the head, so the request does
        not share the cores with the rest of it; the next step starts once the engine is idle
        again. Learning beside the engine (`train_share` > 0), steps go on."""
        self._requests.set()
        if self.settings.train_share <= 0:
            self._interrupt.set()

    def engine_idle(self) -> None:
        """The engine holds no request: idle-time training may start (after `idle_after`).
        Until then the engine counts as busy even between steps, so a prefill longer than
        `idle_after` (no step ends during it) is not taken for idle time."""
        self._requests.clear()

    def _safe_point(self, *_) -> None:
        if self._interrupt.is_set():
            raise StepInterrupted

    def _safe_points(self) -> list:
        """Hooks that call `_safe_point` before each head module's forward, before each
        module's backward (its output passes through `safe_point_in_backward`) and after
        each parameter's gradient; on only through a step (the head's drafting copies,
        taken between steps, never carry them)."""
        def in_backward(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                return safe_point_in_backward(output, self._safe_point)
            return None

        handles = [m.register_forward_pre_hook(self._safe_point) for m in self.head.modules()]
        handles += [m.register_forward_hook(in_backward) for m in self.head.modules()]
        return handles + [p.register_hook(self._safe_point) for p in self.params]

    def pause(self) -> None:
        """No training step runs from now until `resume` (waits for one in flight)."""
        self._paused.set()
        with self._gate:  # the step in flight, if any, ends; later ones see the flag
            pass

    def resume(self) -> None:
        self._paused.clear()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._tick.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive() and self._update_from is not None and self.error is None:
                self._interrupt.clear()  # an update cut short is finished: what is saved is a whole step
                self._update()
            self._thread = None

    @property
    def alive(self) -> bool:
        return self.error is None

    @property
    def buffer_tokens(self) -> int:
        """Tokens in the buffer training draws from (the shared learner's when shared)."""
        return self.shared_buffer_tokens if self.shared else self.buffer.tokens

    # --- shared learning (one learner for several engines) ----------------------------------

    def share(self) -> None:
        """Stop training here: finished sequences go to `buffer.outbox` for a shared learner,
        whose weights arrive through `adopt`."""
        self.stop()
        self.shared = True
        self.buffer.outbox = deque()

    def take_examples(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """The finished sequences left in the outbox since the last call, as (ids [n+1],
        feats [n, F], prompt length); none unless shared."""
        outbox, items = self.buffer.outbox, []
        while outbox:
            it = outbox.popleft()
            items.append((it.ids, it.feats, it.prompt_len))
        return items

    def receive(self, answer: dict) -> None:
        """The shared learner's answer to an exchange (`error`, `steps`, `loss`,
        `buffer_tokens`, and `state` when its weights are newer than this replica's): its
        failure switches learning off here too; newer weights are adopted."""
        if answer["error"] and self.error is None:
            self.error = f"shared learner: {answer['error']}"
        if answer.get("state") is not None:
            self.adopt(answer["state"], answer["steps"], answer["loss"], answer["buffer_tokens"])
        else:
            self.shared_buffer_tokens = answer["buffer_tokens"]

    def adopt(self, state: dict[str, torch.Tensor], steps: int, loss: float | None, buffer_tokens: int) -> None:
        """Take the shared learner's weights: the drafting copy is built here (the caller's
        thread, never the engine's) and swapped in between engine steps like a local one."""
        with self._lock:
            self.head.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v
                                       for k, v in state.items()})
        fresh = with_kernels(self.snapshot().to(dtype=self.draft_dtype), self.quantization)
        with self._ready_lock:
            self.ready = fresh
            self.swaps_made += 1
            self.steps, self.last_loss, self.shared_buffer_tokens = steps, loss, buffer_tokens
        if self.on_swap_made is not None:
            self.on_swap_made(self)

    def snapshot(self) -> EagleHead:
        """A copy of the trained weights (fp32, CPU), consistent between training steps."""
        with self._lock:
            return copy.deepcopy(self.head).eval()

    # --- the trainer thread ---------------------------------------------------------------

    def _run(self) -> None:
        torch.set_num_threads(max(1, self.settings.train_threads))  # this thread's intra-op pool only
        self.low_priority = lower_this_thread()
        s = self.settings
        while not self._stop.is_set():
            ticked = self._tick.wait(s.idle_after)  # False: the engine was idle that long
            self._tick.clear()
            if (not ticked and (s.idle_after is None or self._requests.is_set())) or (ticked and s.train_share <= 0):
                continue
            if self._stop.is_set():
                break
            if self.buffer.tokens < s.min_tokens:
                time.sleep(0.05)
                continue
            start = time.perf_counter()
            with self._gate:
                if self._paused.is_set():
                    continue
                self._interrupt.clear()  # the engine was idle until now
                if not ticked and self._requests.is_set():  # a request came since the check above
                    continue
                self.busy = True
                try:
                    self.train_step()
                except Exception as e:  # noqa: BLE001 - any failure switches learning off, serving goes on
                    self.error = f"{type(e).__name__}: {e}"
                    log.warning("adaptive: online learning switched off: %s", self.error)
                    return
                finally:
                    self.busy = False
                    release_thread_pool()  # between steps the engine's pool is the only one
            if ticked and s.train_share < 1.0:  # the engine is busy: rest so training keeps its share
                self._stop.wait((time.perf_counter() - start) * (1.0 - s.train_share) / s.train_share)
                self._tick.clear()

    def train_step(self) -> float | None:
        """One optimizer step on a batch from the buffer; returns the loss (None: nothing
        learned). Learning only while idle, an arrival (`interrupt`) stops it at a safe
        point: in forward or backward, the step is given up with the head unchanged; in the
        update (parameter by parameter) or while the drafting copy is built, what is left
        is done first at the next call, which then goes on to a new step."""
        self.thread_ids.add(threading.get_ident())
        try:
            if self._update_from is not None:  # an update cut short: finish it before anything else
                self._update()
            if self._copy_due:
                self._make_copy()
            return self._learn()
        except StepInterrupted:
            self.interrupted += 1
            return None

    def _learn(self) -> float | None:
        batch = self.buffer.sample(self.settings.batch_size, self._rng, self.held_out)
        if batch is None:
            return None
        s = self.settings
        micro = s.micro_batch or s.batch_size
        parts = batch.split(micro)
        bf16 = self.target.dtype == torch.bfloat16  # the target's own weights enter the loss
        lr = s.lr * min(1.0, (self._fresh_steps + 1) / max(1, s.warmup))  # linear warm-up: Adam's first steps are the largest
        for opt in self.opts:
            for group in opt.param_groups:
                group["lr"] = lr
        with self._lock:
            hooks = self._safe_points()
            try:
                self._zero_grad()
                losses = []
                for part in parts:  # each part's windows weigh as much as in the whole batch
                    self._safe_point()
                    with torch.autocast(self.head.device.type, dtype=torch.bfloat16, enabled=bf16):
                        loss, _ = self.objective(part.to(self.head.device))
                    if not loss.requires_grad:  # no answer token in these windows
                        continue
                    self._safe_point()
                    (loss * (part.ids.shape[0] / batch.ids.shape[0])).backward()
                    losses.append((float(loss.detach()) * part.ids.shape[0], part.ids.shape[0]))
                if not losses:
                    return None
            except StepInterrupted:  # a request arrived: give the step up, the head unchanged
                self._zero_grad()
                raise
            finally:
                for hook in hooks:
                    hook.remove()
            torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
            self.last_loss = sum(x for x, _ in losses) / sum(n for _, n in losses)
            self._update_from = 0
        self._update()
        return self.last_loss

    def weights(self) -> dict[str, torch.Tensor]:
        """A copy of the trained head's weights now (for `restore`)."""
        with self._lock:
            return {k: v.detach().clone() for k, v in self.head.state_dict().items()}

    def restore(self, weights: dict[str, torch.Tensor]) -> None:
        """Put back weights taken by `weights` (the optimizer's moments stay as they are)."""
        with self._lock:
            self.head.load_state_dict(weights)

    def loss_on(self, items: list[Stored]) -> float | None:
        """The objective's loss of the head now on every window of `items` (at most `max_len`
        pairs each, from each sequence's start), no training: the mean over windows with an
        answer token, weighted by their count; None when none has one."""
        size = self.buffer.max_len
        windows = [it.window(a, size) for it in items for a in range(0, it.feats.shape[0], size)]
        bf16 = self.target.dtype == torch.bfloat16
        total, count = 0.0, 0
        with self._lock, torch.no_grad():
            for i in range(0, len(windows), self.settings.batch_size):
                batch = Batch.of_windows(windows[i: i + self.settings.batch_size])
                with torch.autocast(self.head.device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss, metrics = self.objective(batch.to(self.head.device))
                if "ce0" in metrics:  # some window of the batch has an answer token
                    total, count = total + float(loss) * batch.ids.shape[0], count + batch.ids.shape[0]
        return total / count if count else None

    def _zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _update(self) -> None:
        """Apply the step's gradients parameter by parameter from `_update_from`, stopping
        (StepInterrupted) between two when a request arrives; then count the step and, every
        `swap_every` steps, build the drafting copy."""
        with self._lock:
            for j in range(self._update_from, len(self.opts)):
                if self._interrupt.is_set():
                    self._update_from = j
                    raise StepInterrupted
                self.opts[j].step()
                self.params[j].grad = None
            self._update_from = None
            self.steps += 1
            self._fresh_steps += 1
        if self.steps % self.settings.swap_every == 0:
            self._copy_due = True
            self._make_copy()

    def _make_copy(self) -> None:
        """The drafting copy of the trained weights (bf16 / the target's kernels), left in
        `ready` for the engine to swap in; stops between two projections on an arrival."""
        self._safe_point()
        fresh = with_kernels(self.snapshot().to(dtype=self.draft_dtype), self.quantization, self._safe_point)
        with self._ready_lock:
            self.ready = fresh
            self.swaps_made += 1
            self._copy_due = False
        if self.on_swap_made is not None:
            self.on_swap_made(self)
