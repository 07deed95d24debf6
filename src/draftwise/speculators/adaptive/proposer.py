"""`adaptive`: a static speculator, a head learned online from the traffic, and the suffix
cache, under a controller that picks one of them per request and step (after Together's
ATLAS; see docs/adaptive.md).

Parts:
- `static`: any other method (`static` in the config; default: the shipped EAGLE head of
  the target when there is one, else prompt lookup). It never changes: the floor.
- `learner`: an EAGLE head (`learner.init`: a shipped head, a folder, or a new head) that
  keeps training on finished requests (`adaptive/online.py`) in a thread of its own;
  new weights are swapped in between engine steps.
- `suffix`: the suffix cache, which learns from traffic without training.

It is one `Proposer`: it forwards `begin`, `on_hidden`, `on_accept` and `end` to every part
(so each stays in step with the committed tokens), and in `propose` asks its `Arbiter`
(`adaptive/control.py`) which part drafts for which request. Parts that did not
draft are scored in `on_accept` against the tokens the target committed: lookup proposals
by matching, EAGLE heads by their first-token accuracy when they catch up (every
`SHADOW_EVERY` steps). The engine's controller still sets the budget of each step (tree
nodes, or chain length for chain parts) and switches speculation off when it does not pay.

With `adaptive_state`, what it learned survives a restart (`adaptive/state.py`): the head,
the arbiter's estimates and the replay buffer's traffic, saved every `save_every` swaps,
every `SAVE_EVERY_REQUESTS` finished requests (off the engine's thread) and at `close`,
whether or not a training step has run.

Lossless by construction: whichever part drafts, and whatever weights the learner holds,
the target verifies every token.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from draftwise.config import SpeculativeConfig
from draftwise.errors import BadInput
from draftwise.heads import SHIPPED
from draftwise.request import RequestState
from draftwise.speculators.adaptive.control import Arbiter, geometric_tokens
from draftwise.speculators.adaptive.online import LearnerSettings, OnlineLearner, ReplayBuffer
from draftwise.speculators.adaptive.state import AdaptiveState
from draftwise.speculators.base import Draft, Learned, Proposer, Sharing, Target, proposer_class, register
from draftwise.speculators.eagle import (EagleHead, EagleProposer, config_for_target, default_eagle3_layers,
                                         init_head_from_target, load_eagle_head)
from draftwise.speculators.suffix import SuffixProposer
from draftwise.tree import matched_length

log = logging.getLogger("draftwise.adaptive")

LOOKUP = ("ngram", "suffix")  # methods whose proposals are cheap enough to make for every request
SHADOW_EVERY = 4  # steps between catch-ups of EAGLE parts that are not drafting (their shadow score)
SAVE_EVERY_REQUESTS = 8  # finished requests between saves of the state (its traffic included)
NEW_HEAD_VOCAB = 16384  # a new head drafts over the lowest ids (BPE merges: the most frequent first)


def shipped_head_for(target_name: str) -> str | None:
    for head in SHIPPED.values():
        if head.method == "eagle" and head.target == target_name:
            return head.name
    return None


def default_static(config: SpeculativeConfig, target: Target) -> SpeculativeConfig:
    head = shipped_head_for(target.name)
    if head is not None:
        return SpeculativeConfig(method="eagle", model=head, num_speculative_tokens=config.num_speculative_tokens,
                                 eagle_tree_depth=config.eagle_tree_depth, eagle_tree_top_k=config.eagle_tree_top_k)
    return SpeculativeConfig(method="ngram", num_speculative_tokens=min(config.num_speculative_tokens, 8))


def new_head(target_model) -> EagleHead:
    """A fresh EAGLE-3 head for the target, over the `NEW_HEAD_VOCAB` lowest token ids."""
    tcfg = target_model.config
    size = min(tcfg.vocab_size, NEW_HEAD_VOCAB)
    ids = torch.arange(size) if size < tcfg.vocab_size else None
    cfg = config_for_target(tcfg, "eagle3", size if ids is not None else None,
                            default_eagle3_layers(tcfg.num_hidden_layers))
    return init_head_from_target(cfg, target_model, ids, seed=0)


def default_train_share(target_model) -> float:
    """Training's share of wall time while requests run, unless configured: 0.1 on a GPU or a
    CPU of more than 4 cores; 0 (learn between requests only) on a smaller CPU, where a
    training step takes a core serving needs (measured on 2 cores: serving ran 0.7-0.9x
    plain with learning on at 0.1, against 1.1-1.6x without; docs/adaptive.md)."""
    if target_model.device.type != "cpu" or (os.cpu_count() or 1) > 4:
        return 0.1
    return 0.0


@dataclass
class _Pending:
    chosen: str | None
    committed: int  # len(output_ids) when drafted
    shadows: dict[str, tuple[list[int], list[int] | None]] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)  # lookup parts' own scores of their proposals


@register
class AdaptiveProposer(Proposer):
    name = "adaptive"
    drafts_trees = True  # of any depth up to the budget (a chain part's draft): `max_tree_depth` None

    def __init__(self, parts: dict[str, Proposer], caps: dict[str, int], learner: OnlineLearner | None = None,
                 data_layers: Sequence[int] = (), depth: int = 5, state: AdaptiveState | None = None,
                 save_every: int = 25) -> None:
        self.parts = parts
        self.caps = caps  # part -> most tokens it drafts (chain parts), whatever the budget
        self.learner = learner
        self.data_layers = list(data_layers)
        self.depth = depth
        self.state = state
        self.save_every = save_every
        self.arbiter = Arbiter(parts)
        if state is not None and state.saved is not None:
            self.arbiter.load_state(state.saved.get("arbiter", {}))
        self.lookups = [p for p, prop in parts.items() if prop.name in LOOKUP]
        self.heads = [p for p, prop in parts.items() if isinstance(prop, EagleProposer)]
        for p in self.heads:
            self.parts[p].track_hits = True
        layers = set(self.data_layers)
        for prop in parts.values():
            layers |= set(prop.hidden_layers)
        self.hidden_layers = tuple(sorted(layers))
        self.pending: dict[str, _Pending] = {}
        self.features: dict[str, list[torch.Tensor]] = {}  # request id -> [n, F] chunks for the buffer
        self.swaps = 0
        self.steps = 0
        self._proposed_at: float | None = None
        self._accepted_since_tick: set[str] = set()  # requests seen in on_accept since the last tick
        self._engine_threads: int | None = None  # the engine thread's intra-op threads, learned at its first step
        self._learner_off_logged = False
        self._unsaved = 0  # requests finished since the last save of the state
        carried = (state.saved or {}).get("learner", {}) if state is not None else {}
        self.learned_requests = int(carried.get("requests", 0))  # finished requests the buffer took, all processes
        self.learned_tokens = int(carried.get("tokens", 0))
        self._first_loss = carried.get("first_loss")  # the state's first training loss
        self._saver: threading.Thread | None = None
        self._save_lock = threading.Lock()
        self._head_saved_at = learner.steps if learner is not None else 0  # the learner's steps at the last head save
        if learner is not None:
            learner.on_swap_made = self._maybe_save
            learner.start()

    # --- building -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: SpeculativeConfig, target: Target) -> "AdaptiveProposer":
        static_cfg = config.static or default_static(config, target)
        try:
            static_cls = proposer_class(static_cfg.method)
        except ValueError as e:
            raise BadInput(f"adaptive: static: {e}") from None
        state = AdaptiveState(config.adaptive_state, target.name) if config.adaptive_state else None
        wanted = set(config.parts or ("static", "learner", "suffix"))
        parts: dict[str, Proposer] = {}
        caps: dict[str, int] = {}
        if "static" in wanted:
            parts["static"] = static_cls.from_config(static_cfg, target)
            caps["static"] = static_cfg.num_speculative_tokens
        if "suffix" in wanted and not ("static" in wanted and static_cfg.method == "suffix"):
            parts["suffix"] = SuffixProposer.from_config(config, target)
            caps["suffix"] = config.num_speculative_tokens
        learner, layers = None, []
        lc = config.learner
        if lc.enabled and "learner" in wanted:
            head = state.load_head(target.model) if state is not None else None
            trained = head is not None
            if head is None:
                init = shipped_head_for(target.name) if lc.init == "auto" else lc.init
                trained = bool(init)
                head = load_eagle_head(init, target.model) if init else new_head(target.model).to(
                    device=target.model.device, dtype=target.model.dtype)
            part = EagleProposer(head, target.model, target.max_batch_size, target.max_model_len,
                                 config.eagle_tree_top_k, config.eagle_tree_depth, config.eagle_total_tokens)
            parts["learner"] = part
            caps["learner"] = config.num_speculative_tokens
            tcfg = target.model.config
            layers = sorted(set(head.config.resolved_layers(tcfg.num_hidden_layers)) | {tcfg.num_hidden_layers - 1})
            settings = LearnerSettings(train_threads=lc.train_threads, train_every=lc.train_every,
                                       train_share=default_train_share(target.model) if lc.train_share is None
                                       else lc.train_share, idle_after=1.0 if lc.train_when_idle else None,
                                       min_tokens=lc.min_tokens, batch_size=lc.batch_size,
                                       lr=lc.lr or (3e-5 if trained else 1e-3), warmup=lc.warmup,
                                       ttt_steps=lc.ttt_steps, swap_every=lc.swap_every)
            buffer = ReplayBuffer(lc.buffer_tokens, lc.max_len)
            learner = OnlineLearner(head, target.model, layers, buffer, settings,
                                    getattr(target.model, "quantization", "none"))
            if state is not None and state.saved is not None:
                saved = state.saved.get("learner", {})
                learner.steps = int(saved.get("steps", 0))
                learner.swaps_made = int(saved.get("swaps", 0))
            if state is not None:  # the traffic earlier processes served
                for item in state.load_traffic(len(layers) * tcfg.hidden_size):
                    buffer.put(item)
        if not parts:
            raise BadInput("adaptive: no part left to draft (parts: [\"learner\"] with the learner disabled)")
        return cls(parts, caps, learner, layers, config.eagle_tree_depth, state, lc.save_every)

    # --- lifecycle ------------------------------------------------------------------------

    def attach_target_cache(self, cache) -> None:
        for prop in self.parts.values():
            prop.attach_target_cache(cache)

    def begin(self, request: RequestState) -> None:
        for prop in self.parts.values():
            prop.begin(request)
        if self._learning:
            self.features[request.request_id] = []

    def on_hidden(self, request: RequestState, hidden: dict[int, torch.Tensor]) -> None:
        if self._proposed_at is not None:  # the first call after a step: the target pass just ended
            self.arbiter.observe_pass(time.perf_counter() - self._proposed_at)
            self._proposed_at = None
        for prop in self.parts.values():
            if prop.hidden_layers:
                prop.on_hidden(request, hidden)
        chunks = self.features.get(request.request_id)
        if chunks is not None and self._learning:
            chunks.append(torch.cat([hidden[i] for i in self.data_layers], dim=-1).to(torch.bfloat16).cpu())

    def on_accept(self, request: RequestState, num_accepted: int) -> None:
        # a step that drafted nothing does not call `propose`: a request seen twice is a new step
        if request.request_id in self._accepted_since_tick:
            self._tick()
        self._accepted_since_tick.add(request.request_id)
        for prop in self.parts.values():
            prop.on_accept(request, num_accepted)
        rid = request.request_id
        pend = self.pending.pop(rid, None)
        if pend is not None:
            committed = request.output_ids[pend.committed:]
            if pend.chosen is not None:
                self.arbiter.observe(rid, pend.chosen, num_accepted, score=pend.scores.get(pend.chosen))
                self.arbiter.accepted[pend.chosen] += num_accepted
            for part, (tokens, parents) in pend.shadows.items():
                self.arbiter.observe(rid, part, matched_length(tokens, parents, committed), shadow=True,
                                     score=pend.scores.get(part))
        for part in self.heads:
            correct, total = self.parts[part].take_hits(request)
            if total and (pend is None or pend.chosen != part):
                self.arbiter.observe_prediction(rid, part, geometric_tokens(correct / total, self.depth))

    def end(self, request: RequestState) -> None:
        for prop in self.parts.values():
            prop.end(request)
        rid = request.request_id
        self.pending.pop(rid, None)
        self.arbiter.forget(rid)
        chunks = self.features.pop(rid, None)
        if chunks and self._learning:
            feats = torch.cat(chunks)
            self.learner.buffer.add(request.all_ids[: feats.shape[0] + 1], feats, len(request.prompt_ids))
            self.learned_requests += 1
            self.learned_tokens += feats.shape[0]
        if self.state is not None:
            self._unsaved += 1
            if self._unsaved >= SAVE_EVERY_REQUESTS:
                self._save_in_background()

    def pause(self) -> None:
        """Hold the learner, let a save in flight finish, and give the calling (engine)
        thread back all its cores: the engine that runs next on this thread must not
        inherit the share left to training, nor share the cores with a save."""
        if self.learner is not None:
            self.learner.pause()
            self._restore_threads()
        if self._saver is not None:
            self._saver.join()

    def resume(self) -> None:
        if self.learner is not None:
            self.learner.resume()

    def request_arrived(self) -> None:
        if self.learner is not None:
            self.learner.interrupt()

    def engine_idle(self) -> None:
        if self.learner is not None:
            self.learner.engine_idle()

    def close(self) -> None:
        """Stop the learner and save the state (when a folder was given): the head if a step
        trained it, the arbiter's estimates and the stored traffic in any case."""
        if self.learner is None:
            if self.state is not None:
                self._save()
            return
        self.learner.stop()
        self._restore_threads()
        if self.state is not None:
            if self._saver is not None:
                self._saver.join()
            self._save()

    # --- drafting -------------------------------------------------------------------------

    @property
    def _learning(self) -> bool:
        return self.learner is not None and self.learner.alive

    def _tick(self) -> None:
        """One engine step: estimates age, the learner may take a training step."""
        self.steps += 1
        self._accepted_since_tick.clear()
        self.arbiter.step()
        if self.learner is not None:
            self._share_cores()
        if self._learning:
            self.learner.tick()
            fresh = self.learner.take_ready()  # the swap: one assignment, between target passes
            if fresh is not None:
                self.parts["learner"].set_head(fresh)
                self.swaps += 1

    def _restore_threads(self) -> None:
        """The engine thread's own thread count again (when called on the engine's thread)."""
        if self._engine_threads is not None and self.learner.target.device.type == "cpu":
            torch.set_num_threads(self._engine_threads)

    def _share_cores(self) -> None:
        """On the CPU, while a training step runs, the engine's thread (this one) uses its
        cores minus the trainer's: two thread pools on the same cores slow both far more
        than the cores they take (torch keeps the thread count per thread)."""
        if self.learner.target.device.type != "cpu":
            return
        if self._engine_threads is None:
            self._engine_threads = torch.get_num_threads()
        full = self._engine_threads
        ln = self.learner
        # learning only while idle, with the trainer at the lowest priority: a step in flight when a
        # request arrives goes on in the engine's gaps, and the engine keeps every core
        yields = ln.low_priority and ln.settings.train_share <= 0
        want = max(1, full - ln.settings.train_threads) if ln.busy and not yields else full
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)

    def _eligible_parts(self) -> list[str]:
        parts = list(self.parts)
        if self.learner is not None and not self.learner.alive:
            if not self._learner_off_logged:
                log.warning("adaptive: the learner failed (%s); drafting goes on without it", self.learner.error)
                self._learner_off_logged = True
            parts.remove("learner")
        return parts

    def propose(self, requests: Sequence[RequestState], num_tokens: Sequence[int]) -> Draft:
        self._tick()
        draft = Draft.empty(len(requests))
        active = [i for i, k in enumerate(num_tokens) if k > 0]
        if not active:
            return draft
        parts = self._eligible_parts()
        lookups: dict[str, Draft] = {}
        for part in self.lookups:
            if part in parts:
                start = time.perf_counter()
                lookups[part] = self.parts[part].propose([requests[i] for i in active],
                                                         [min(num_tokens[i], self.caps[part]) for i in active])
                self.arbiter.observe_cost(part, (time.perf_counter() - start) / len(active))
        groups: dict[str, list[int]] = {}
        for j, i in enumerate(active):
            req = requests[i]
            eligible = [p for p in parts if p not in lookups or lookups[p].tokens[j]]
            scores = {p: d.scores[j] for p, d in lookups.items() if d.scores is not None and d.tokens[j]}
            chosen = self.arbiter.choose(req.request_id, eligible, scores)
            shadows = {p: (d.tokens[j], d.parents[j]) for p, d in lookups.items() if p != chosen and d.tokens[j]}
            self.pending[req.request_id] = _Pending(chosen, len(req.output_ids), shadows, scores)
            if chosen is None:
                continue
            req.stats.drafted_by[chosen] = req.stats.drafted_by.get(chosen, 0) + 1
            if chosen in lookups:
                draft.tokens[i], draft.parents[i] = lookups[chosen].tokens[j], lookups[chosen].parents[j]
            else:
                groups.setdefault(chosen, []).append(i)
        for part, members in groups.items():
            start = time.perf_counter()
            sub = self.parts[part].propose([requests[i] for i in members],
                                           [min(num_tokens[i], self.caps[part]) for i in members])
            self.arbiter.observe_cost(part, (time.perf_counter() - start - sub.prefill_seconds) / len(members))
            draft.prefill_seconds += sub.prefill_seconds
            for m, i in enumerate(members):
                draft.tokens[i], draft.parents[i], draft.probs[i] = sub.tokens[m], sub.parents[m], sub.probs[m]
        if self.steps % SHADOW_EVERY == 0:  # heads not drafting catch up, for their shadow score
            for part in self.heads:
                if part in parts:
                    draft.prefill_seconds += self.parts[part].catch_up(
                        [requests[i] for i in active if i not in groups.get(part, [])])
        self._proposed_at = time.perf_counter()
        return draft

    # --- replicas behind one endpoint (server/ray_serve.py) ----------------------------------

    def share(self) -> Sharing | None:
        """Every part shares what it learns (the suffix cache its finished sequences); the
        learner stops training here, and its spec builds the one learner of all replicas."""
        sequences = False
        for prop in self.parts.values():
            got = prop.share()
            sequences = sequences or (got is not None and got.sequences)
        learner = None
        if self.learner is not None:
            self.learner.share()
            learner = self.learner.spec()
        return Sharing(sequences, learner) if sequences or learner is not None else None

    def take_shared(self) -> Learned:
        out = Learned()
        for prop in self.parts.values():
            out.sequences += prop.take_shared().sequences
        if self.learner is not None:
            out.examples = self.learner.take_examples()
        return out

    def adopt(self, sequences: Sequence[list[int]] = (), learner: dict | None = None) -> None:
        for prop in self.parts.values():
            prop.adopt(sequences)
        if learner is not None and self.learner is not None:
            self.learner.receive(learner)

    # --- state and metrics ----------------------------------------------------------------

    def _learner_counters(self) -> dict:
        ln = self.learner
        if self._first_loss is None:
            self._first_loss = ln.last_loss
        return {"steps": ln.steps, "swaps": ln.swaps_made, "loss": ln.last_loss, "first_loss": self._first_loss,
                "buffer_tokens": ln.buffer_tokens, "requests": self.learned_requests, "tokens": self.learned_tokens}

    def save_state(self, head: bool = False) -> None:
        """Save the state now (head if trained since the last save, or if `head`: its
        weights were put back; estimates, traffic)."""
        self._save(head)

    def _save(self, head: bool = False) -> None:
        with self._save_lock:  # the trainer thread, the engine's and a background save may all get here
            ln = self.learner
            if ln is None:
                self.state.save(None, self.arbiter.state(), {})
                return
            steps = ln.steps
            trained = head or steps > self._head_saved_at  # a head is written only when its weights changed
            self.state.save(ln.snapshot() if trained else None, self.arbiter.state(), self._learner_counters())
            self._head_saved_at = steps
            if not ln.shared:
                self.state.save_traffic(ln.buffer.snapshot())
            self._unsaved = 0

    def _save_in_background(self) -> None:
        """Every `SAVE_EVERY_REQUESTS` finished requests: the state saved off the engine's
        thread (one save at a time; a request finishing meanwhile waits for the next)."""
        if self._saver is not None and self._saver.is_alive():
            return
        self._unsaved = 0

        def run() -> None:
            try:
                self._save()
            except OSError as e:
                log.warning("adaptive: could not save the state to %s: %s", self.state.folder, e)

        self._saver = threading.Thread(target=run, name="draftwise-adaptive-save", daemon=True)
        self._saver.start()

    def _maybe_save(self, learner: OnlineLearner) -> None:
        """In the trainer thread, after each new drafting copy: save every `save_every` of them."""
        if self.state is not None and learner.swaps_made % self.save_every == 0:
            try:
                self._save()
            except OSError as e:
                log.warning("adaptive: could not save the state to %s: %s", self.state.folder, e)

    def report(self) -> dict[str, float]:
        """Counters for metrics: per part drafts / accepted / shadow scores / estimate; learner state."""
        a = self.arbiter
        out: dict[str, float] = {"steps_without_draft": a.none_chosen, "swaps": self.swaps}
        for p in self.parts:
            out[f"{p}_drafts"] = a.chosen[p]
            out[f"{p}_accepted_tokens"] = a.accepted[p]
            out[f"{p}_shadow_scores"] = a.shadowed[p]
            out[f"{p}_expected_tokens"] = round(a.window_tokens(p), 4)
        if self.learner is not None:
            ln = self.learner
            out.update({"learner_steps": ln.steps, "learner_loss": ln.last_loss if ln.last_loss is not None else 0.0,
                        "learner_buffer_tokens": ln.buffer_tokens, "learner_alive": float(ln.alive),
                        "learner_requests": self.learned_requests, "learner_tokens": self.learned_tokens})
        return out
