"""The engine: requests in, tokens out, with batching and optional speculation.

Requests wait in a queue, are prefilled into a free cache row, then advance together:
each `step()` proposes drafts for every running request, verifies all of them in one
target pass, and commits what was accepted. Requests join and leave between steps.
Stop conditions (EOS, stop token ids, stop strings, max tokens) are applied to every
committed token, so an accepted draft never runs past a stop. A request with
structured_outputs carries a grammar matcher: each step's draft is fitted to it (forbidden
nodes cut, forced tokens added; engine/constrained.py), verification applies its masks,
and the request stops where the grammar is complete.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from draftwise.engine.constrained import FORCED_MAX, FittedBatch, constraint_for, count_forced, fit_batch, own_accepted
from draftwise.engine.controller import Controller
from draftwise.metrics import SpecStats
from draftwise.engine.step import prefill, target_step
from draftwise.errors import RequestRefused
from draftwise.models.transformer import Transformer
from draftwise.request import RequestState
from draftwise.sampling import SamplingParams, TokenLogprob
from draftwise.speculators.base import Draft, Proposer
from draftwise.verify import Verified

log = logging.getLogger(__name__)


# The KV cache is allocated up front for every row: a 32k context at batch 16 would take
# 15 GB for a 1.5B model. Unless asked for more, the context window is capped here.
DEFAULT_MAX_MODEL_LEN = 8192


def context_window(model: Transformer, max_model_len: int | None) -> int:
    """The context window to allocate: `max_model_len`, else the model's (at most
    DEFAULT_MAX_MODEL_LEN), never past what the model supports."""
    return min(max_model_len or DEFAULT_MAX_MODEL_LEN, model.config.max_position_embeddings)


@dataclass
class StepOutput:
    request: RequestState
    new_token_ids: list[int]  # tokens committed this step (after stop handling)
    finished: bool
    new_logprobs: list[TokenLogprob] | None = None  # theirs, when the request asks for logprobs


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer,
        *,
        proposer: Proposer | None = None,
        controller: Controller | None = None,
        max_batch_size: int = 8,
        max_model_len: int | None = None,
        max_speculative_tokens: int = 0,
        seed: int | None = None,
    ) -> None:
        """`seed`: requests that set none get seeds drawn from this one (a reproducible run, as
        vLLM's engine seed); None: from torch's global generator."""
        self.model = model
        self.tokenizer = tokenizer
        self.proposer = proposer
        self.controller = controller
        self.max_model_len = context_window(model, max_model_len)
        # cache slots a verify pass may write past the end (a speculator's draft, plus forced tokens of a grammar)
        self.max_draft = max_speculative_tokens
        self.slack = max_speculative_tokens + 1 + (FORCED_MAX if proposer is not None else 0)
        self.cache = model.new_cache(max_batch_size, self.max_model_len + self.slack)
        if proposer is not None:
            proposer.attach_target_cache(self.cache)
        self.free_rows = list(range(max_batch_size))
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self.totals = SpecStats()
        self._ids = itertools.count()
        self._seeds = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        self.eos_ids = set(model.config.eos_token_ids)

    # --- requests -----------------------------------------------------------------------

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None) -> RequestState:
        prompt_ids = list(prompt_ids)
        max_tokens = self.check_prompt(prompt_ids, params.max_tokens)
        self.check_token_ids(params)
        banned = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids))
        seed = params.seed if params.seed is not None else self.next_seed()
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        req = RequestState(request_id or f"req-{next(self._ids)}", prompt_ids, params, generator=gen, noise_seed=seed,
                           max_tokens=max_tokens, banned=banned if params.min_tokens else [],
                           constraint=constraint_for(params, self.tokenizer, self.model.config))
        self.waiting.append(req)
        if self.proposer is not None:
            self.proposer.request_arrived()
        return req

    def check_prompt(self, prompt_ids: Sequence[int], max_tokens: int | None) -> int:
        """The tokens a request with this prompt may generate (`max_tokens`, or what the
        context window leaves when None), or RequestRefused: an empty prompt, an id outside
        the vocabulary, or more tokens than the window holds. Reads only the model's
        configuration, so any thread may call it (the server does, before queueing)."""
        vocab, limit = self.model.config.vocab_size, self.max_model_len
        if not prompt_ids:
            raise RequestRefused("the prompt is empty", "prompt")
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestRefused(f"prompt token ids must be in [0, {vocab})", "prompt")
        wanted = max_tokens if max_tokens is not None else max(limit - len(prompt_ids), 1)
        if len(prompt_ids) + wanted > limit:
            raise RequestRefused(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt_ids) + wanted} tokens ({len(prompt_ids)} in the prompt, {wanted} for the completion). "
                f"Please reduce the length of the prompt or of the completion.", "prompt", "context_length_exceeded")
        return wanted

    def check_token_ids(self, params: SamplingParams) -> None:
        """RequestRefused when the sampling params name a token outside the vocabulary
        (logit_bias, stop_token_ids); like check_prompt, safe from any thread."""
        vocab = self.model.config.vocab_size
        for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            if any(not 0 <= t < vocab for t in ids):
                raise RequestRefused(f"{name} token ids must be in [0, {vocab})", name)

    def next_seed(self) -> int:
        """The seed of a request that set none."""
        return int(torch.randint(0, 2**62, (), generator=self._seeds).item())

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its cache row."""
        for req in list(self.running):
            if req.request_id == request_id:
                self._finish(req, "abort")
        self.waiting = deque(r for r in self.waiting if r.request_id != request_id)
        self._signal_idle()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- stepping -----------------------------------------------------------------------

    def _signal_idle(self) -> None:
        """No request left, waiting or running: the speculator may use the idle time."""
        if not self.has_work and self.proposer is not None:
            self.proposer.engine_idle()

    def step(self) -> list[StepOutput]:
        """Admit waiting requests (prefill), else advance running ones by one target pass."""
        outputs = self._step()
        self._signal_idle()
        return outputs

    def _step(self) -> list[StepOutput]:
        if self.waiting and self.free_rows:
            return self._admit()
        if not self.running:
            return []
        reqs = list(self.running)
        t0 = time.perf_counter()
        fitted = self._propose(reqs)
        draft = fitted.draft
        t1 = time.perf_counter()
        results, hidden = target_step(self.model, self.cache, reqs, draft, self._hidden_layers(), fitted.allowed)
        t2 = time.perf_counter()
        if self.controller is not None:
            width = 1 + max(len(t) for t in draft.tokens)
            drafted = max(len(t) for t in fitted.original.tokens)  # forced tokens cost no drafting
            self.controller.observe(len(reqs), width, t2 - t1, drafted, t1 - t0 - draft.prefill_seconds)
        outputs = []
        for i, (req, res) in enumerate(zip(reqs, results)):
            n_draft = len(draft.tokens[i])
            req.stats.target_passes += 1
            req.stats.observe_draft(n_draft, res.num_accepted)
            count_forced(req, fitted, i, res)
            req.stats.draft_seconds += (t1 - t0) / len(reqs)
            req.stats.verify_seconds += (t2 - t1) / len(reqs)
            outputs.append(self._commit(req, res))
            if not req.finished and self.proposer is not None:
                if hidden[i]:
                    self.proposer.on_hidden(req, hidden[i])
                self.proposer.on_accept(req, own_accepted(fitted, i, res))
        return outputs

    def _hidden_layers(self) -> tuple[int, ...]:
        return self.proposer.hidden_layers if self.proposer is not None else ()

    def _propose(self, reqs: list[RequestState]) -> FittedBatch:
        """The speculator's drafts, fitted to the grammars of constrained rows (plain decoding,
        without a speculator, drafts nothing, not even forced tokens)."""
        if self.proposer is None or self.controller is None:
            return fit_batch(reqs, Draft.empty(len(reqs)), [0] * len(reqs))
        budgets, limits = [], []
        for req, k in zip(reqs, self.controller.choose(reqs)):
            room = req.max_tokens - len(req.output_ids) - 1  # the bonus token comes on top
            k = max(0, min(k, room, self.max_draft))
            req.stats.num_speculative_tokens.append(k)
            budgets.append(k)
            limits.append(min(k + FORCED_MAX, room, self.slack - 1))  # forced tokens come on top of the budget
        draft = self.proposer.propose(reqs, budgets) if any(budgets) else Draft.empty(len(reqs))
        for i, k in enumerate(budgets):  # a proposer may not overrun its budget
            if len(draft.tokens[i]) > k:
                raise RuntimeError(f"{type(self.proposer).__name__} proposed more than {k} tokens")
        return fit_batch(reqs, draft, limits)

    def _admit(self) -> list[StepOutput]:
        batch = []
        while self.waiting and self.free_rows:
            req = self.waiting.popleft()
            req.row = self.free_rows.pop(0)
            batch.append(req)
        results, hidden = prefill(self.model, self.cache, batch, self._hidden_layers())
        outputs = []
        for req, res, hid in zip(batch, results, hidden):
            self.running.append(req)
            req.stats.target_passes += 1
            if self.proposer is not None:
                self.proposer.begin(req)
                if hid:
                    self.proposer.on_hidden(req, hid)
            outputs.append(self._commit(req, res))
        return outputs

    def _commit(self, req: RequestState, res: Verified) -> StepOutput:
        """Append the verified tokens one by one, stopping at the first stop condition."""
        new: list[int] = []
        p = req.params
        for tok in res.tokens:
            if req.constraint is not None and not req.constraint.takes(tok):
                # the grammar allowed no token here (a dead end of the grammar engine, e.g. a
                # literal that only a special token spells): end the answer, never crash
                log.warning("request %s: the grammar allows no continuation after %d tokens; finished",
                            req.request_id, len(req.output_ids))
                self._finish(req, "stop")
                break
            req.output_ids.append(tok)
            new.append(tok)
            if req.constraint is not None:
                req.constraint.advance(tok)
                if req.constraint.stopped:  # the grammar is complete: nothing more may follow
                    self._finish(req, "stop")
                    break
            eos = tok in self.eos_ids and not p.ignore_eos
            if eos or tok in p.stop_token_ids:  # banned before min_tokens
                req.stop_reason = None if eos else tok  # EOS first, as vLLM: no stop reason
                self._finish(req, "stop")
                break
            if p.stop and len(req.output_ids) >= p.min_tokens and self._hit_stop_string(req):
                self._finish(req, "stop")
                break
            if len(req.output_ids) >= req.max_tokens:
                self._finish(req, "length")
                break
        req.stats.output_tokens = len(req.output_ids)
        logprobs = None if res.logprobs is None else res.logprobs[: len(new)]
        if logprobs is not None:
            req.output_logprobs.extend(logprobs)
        return StepOutput(req, new, req.finished, logprobs)

    def _hit_stop_string(self, req: RequestState) -> bool:
        """Does a stop string end in the newest token? Only the last tokens are decoded (a stop
        string of L characters spans at most L tokens; 8 more cover partial characters), so
        the check costs the same at any output length; the whole output is decoded once, on
        a hit, for the text up to the stop string."""
        longest = max(len(s) for s in req.params.stop)
        tail_ids = req.output_ids[-(longest + 8):]
        skip = req.params.skip_special_tokens
        tail = self.tokenizer.decode(tail_ids, skip_special_tokens=skip)
        hits = [(i, s) for s in req.params.stop if (i := tail.find(s)) >= 0]
        if hits:
            at, stop = min(hits)
            prev = self.tokenizer.decode(req.output_ids[: len(req.output_ids) - len(tail_ids)],
                                         skip_special_tokens=skip)
            req.stop_text = prev + tail[: at + (len(stop) if req.params.include_stop_str_in_output else 0)]
            req.stop_reason = stop
        return bool(hits)

    def _finish(self, req: RequestState, reason: str) -> None:
        req.finished, req.finish_reason = True, reason
        if req in self.running:
            self.running.remove(req)
            self.free_rows.append(req.row)
            self.free_rows.sort()
            self.cache.reset_row(req.row)
        self.totals.merge(req.stats)
        if self.proposer is not None:
            self.proposer.end(req)

    def close(self) -> None:
        """Shut down: the speculator stops its background work and saves its state."""
        if self.proposer is not None:
            self.proposer.close()

    def run_until_done(self, on_output: Callable[[StepOutput], None] | None = None) -> None:
        while self.has_work:
            for out in self.step():
                if on_output is not None:
                    on_output(out)
