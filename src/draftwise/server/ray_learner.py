"""One learner for every Ray Serve replica: the adaptive speculator's online learning, shared.

Alone, an adaptive speculator (speculators/adaptive/) trains its EAGLE head on the
traffic of its own engine. Behind one endpoint, N replicas each see a 1/N share of the
traffic; trained apart, each head learns from that share only. Here the replicas' heads
learn from all of it:

- the replicas' learners stop training (`Proposer.share`, which also gives the spec the
  actor builds its learner from); each finished request's tokens and target features
  (`Proposer.take_shared`) go to one `SharedLearner` actor (named, created by the first
  replica that asks), every `PUSH_SECONDS`, with whether the replica had work;
- the actor keeps one replay buffer of every replica's traffic and trains one copy of
  the head on it, with the replicas' learner settings and the same rule for when: while
  any replica has work, at most `train_share` of the wall time (0: not at all); once all
  have been idle for `idle_after` seconds (`train_when_idle`), freely;
- every `swap_every` training steps it publishes the weights with a new version; each
  replica, at its next exchange, takes them (`Proposer.adopt`: the drafting copy is
  built in the replica's sync thread) and swaps them in between engine steps. Output is
  unchanged by any swap: verification keeps it the target's.

A failure in the actor switches learning off in every replica with the reason (drafting
goes on without the learner, as it does when a local learner fails). The actor needs the
target for the objective (its embeddings, final norm and LM head): it loads it from the
shared cache like a replica does.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("draftwise.adaptive")

LEARNER_NAME = "draftwise-learner"
BUSY_SECONDS = 3.0  # a replica that reported work this recently counts as busy


def learner_spec(learner: dict, settings) -> dict:
    """What the actor needs to build the same learner as a replica's: the target (from the
    server settings) and the learner's own spec (`Sharing.learner`: head, data layers,
    settings)."""
    return {"model": settings.model, "dtype": settings.dtype, "quantization": settings.quantization,
            "revision": settings.revision, "device": settings.device, **learner}


def shared_learner(spec: dict, num_gpus: float = 0.0):
    """The named learner actor all replicas share (created by the first one to ask)."""
    import ray  # a replica: the extra is there

    @ray.remote(num_cpus=0)
    class SharedLearner:
        def __init__(self, spec: dict) -> None:
            import torch

            from draftwise.models.build import default_device, load_model
            from draftwise.speculators.adaptive import OnlineLearner

            device = spec["device"] or default_device()
            target, _ = load_model(spec["model"], spec["dtype"], device, False, spec["quantization"],
                                   spec["revision"])
            self.swap_every = spec["settings"]["swap_every"]
            self.learner = OnlineLearner.from_spec(spec, target, swap_every=1 << 30)  # publishing is done here
            self.torch = torch
            self.version = 0
            self.published: dict | None = None
            self.received: dict[str, int] = {}  # replica -> sequences received
            self.busy_at: dict[str, float] = {}  # replica -> when it last reported work
            self.error: str | None = None
            self._lock = threading.Lock()
            threading.Thread(target=self._train_forever, name="draftwise-shared-learner", daemon=True).start()

        def exchange(self, replica: str, items: list[tuple], busy: bool, have: int) -> dict:
            """Take a replica's finished sequences; return the state, and the weights when
            they are newer than version `have`."""
            from draftwise.speculators.adaptive import Stored

            for ids, feats, prompt_len in items:
                self.learner.buffer.put(Stored(ids, feats, prompt_len))
            self.received[replica] = self.received.get(replica, 0) + len(items)
            if busy:
                self.busy_at[replica] = time.time()
            out = self.stats()
            if self.version > have:
                with self._lock:
                    out["state"] = self.published
            return out

        def stats(self) -> dict:
            ln = self.learner
            return {"version": self.version, "steps": ln.steps, "loss": ln.last_loss,
                    "buffer_tokens": ln.buffer.tokens, "received": dict(self.received), "error": self.error}

        def _train_forever(self) -> None:
            s = self.learner.settings
            self.torch.set_num_threads(max(1, s.train_threads))
            since_publish = 0
            while True:
                busy = any(time.time() - t < BUSY_SECONDS for t in self.busy_at.values())
                idle_for = time.time() - max(self.busy_at.values(), default=0.0)
                allowed = (s.train_share > 0) if busy else (s.idle_after is not None and idle_for >= s.idle_after)
                if self.error or not allowed or self.learner.buffer.tokens < s.min_tokens:
                    time.sleep(0.1)
                    continue
                start = time.perf_counter()
                try:
                    loss = self.learner.train_step()
                except Exception as e:  # noqa: BLE001 - reported to every replica, which stop learning
                    self.error = f"{type(e).__name__}: {e}"
                    log.warning("adaptive: the shared learner stopped: %s", self.error)
                    continue
                if loss is not None:
                    since_publish += 1
                if since_publish >= self.swap_every:
                    state = {k: v.to(self.torch.bfloat16) if v.is_floating_point() else v
                             for k, v in self.learner.snapshot().state_dict().items()}
                    with self._lock:
                        self.published = state
                        self.version += 1
                    since_publish = 0
                if busy and s.train_share < 1.0:
                    time.sleep((time.perf_counter() - start) * (1.0 - s.train_share) / s.train_share)

    return SharedLearner.options(name=LEARNER_NAME, namespace="draftwise", get_if_exists=True,
                                 lifetime="detached", num_gpus=num_gpus).remote(spec)


class LearnerLink:
    """A replica's side: its proposer's training examples sent, the shared learner's answers
    (the newest weights among them) handed to the proposer (`Proposer.adopt`)."""

    def __init__(self, proposer, learner: dict, engine, settings, replica: str, num_gpus: float = 0.0) -> None:
        """`learner`: the proposer's learner spec (`Sharing.learner`, after `share`)."""
        self.proposer, self.engine, self.replica = proposer, engine, replica
        self.actor = shared_learner(learner_spec(learner, settings), num_gpus)
        self.version = 0

    def sync(self, examples: list[tuple], timeout: float = 60.0) -> None:
        """One exchange with the actor (the replica's sync thread calls it every PUSH_SECONDS)
        with the `examples` the proposer took since the last (`Learned.examples`)."""
        import ray

        out = ray.get(self.actor.exchange.remote(self.replica, examples, bool(self.engine.has_work), self.version),
                      timeout=timeout)
        self.proposer.adopt(learner=out)
        if out.get("state") is not None:
            self.version = out["version"]
