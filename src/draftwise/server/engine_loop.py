"""The engine thread: one background thread owns the Engine and steps it while there is work.

The Engine is not thread safe, so every engine call (add_request, abort, step) happens on
this thread. Asyncio handlers talk to it through a command queue that is drained between
steps, which is also where requests join (continuous batching) and leave (abort). Results
go back to each handler's own asyncio.Queue with `loop.call_soon_threadsafe`, already
detokenized, so handlers never touch engine state.

The thread that hands the engine over (usually the one that loaded the model) releases
its OpenMP workers here: the engine thread then holds the process's only pool, and its
passes run as fast as `LLM.generate` on one thread (kernels/openmp.py says why).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from draftwise.engine.engine import StepOutput
from draftwise.errors import BadInput
from draftwise.kernels.openmp import release_thread_pool
from draftwise.sampling import SamplingParams
from draftwise.server.metrics import ServerMetrics

log = logging.getLogger("draftwise.server")


@dataclass
class Event:
    """What one engine step produced for one choice of a submission (or why it failed)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    stats: dict | None = None  # speculation stats of the choice, on its last event
    logprobs: list | None = None  # TokenLogprob of each of token_ids, when the request asks
    error: str | None = None
    status: int = 500  # HTTP status of `error`


class Submission:
    """One API request: its engine requests (one per choice) and the queue their events go to."""

    _ids = itertools.count()

    def __init__(self, loop: asyncio.AbstractEventLoop, prompts: list[list[int]], params: list[SamplingParams]) -> None:
        self.id = f"sub-{next(self._ids)}"
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.prompts, self.params = prompts, params
        self.arrival = time.perf_counter()
        self.rids = [f"{self.id}-{i}" for i in range(len(prompts))]

    def post(self, event: Event) -> None:
        """Engine thread -> this request's asyncio queue."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that could be the start of a stop string (the longest
    suffix of text that is a proper prefix of one): they wait until the next tokens decide.
    Only those wait, so a long stop string does not hold back text that cannot begin it."""
    if not text:
        return 0
    last, best = text[-1], 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if stop[k - 1] == last and text.endswith(stop[:k]):
                best = k
                break
    return best


@dataclass
class Track:
    """Engine-thread bookkeeping of one engine request."""

    sub: Submission
    index: int
    stops: list[str]  # the request's stop strings: text that could begin one is held back
    text: str = ""  # output decoded so far (incrementally)
    prefix_offset: int = 0  # token window decoded each step: [prefix_offset, end)
    read_offset: int = 0
    printed: int = 0  # characters of `text` already sent
    first_at: float | None = None
    last_at: float = 0.0
    seen: tuple = (0, 0, 0, (), 0, 0, 0)  # stats already counted in the metrics


class EngineLoop:
    def __init__(self, llm, metrics: ServerMetrics, max_queue: int) -> None:
        self.engine = llm.engine
        self.tokenizer = llm.tokenizer
        self.metrics = metrics
        self.capacity = len(self.engine.free_rows) + len(self.engine.running) + max_queue
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._tracks: dict[str, Track] = {}  # engine thread only
        self._lock = threading.Lock()
        self._reserved = 0  # engine requests admitted and not yet finished (guarded by _lock)
        self._thread = threading.Thread(target=self._run, name="draftwise-engine", daemon=True)
        release_thread_pool()

    # --- handler side (event loop thread) ------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._commands.put(("stop", None))
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.engine.close()  # the speculator stops its background work and saves its state

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._reserved

    def try_submit(self, sub: Submission) -> bool:
        """Queue a submission, or return False when the bounded queue is full."""
        with self._lock:
            if self._reserved + len(sub.rids) > self.capacity:
                return False
            self._reserved += len(sub.rids)
        self._commands.put(("add", sub))
        return True

    def abort(self, sub: Submission) -> None:
        self._commands.put(("abort", sub))

    def abort_all(self, message: str) -> None:
        self._commands.put(("abort_all", message))

    # --- engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                if not self._drain_commands(block=not self.engine.has_work):
                    return
                if self.engine.has_work:
                    self._step()
                self._update_queue_gauges()

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued commands; False when told to stop. Before it waits for work, the
        engine thread releases its OpenMP workers, so that another pool (a trainer using the
        idle time, another engine in this process) is the only one while it waits."""
        try:
            if block:
                release_thread_pool()
            cmd = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            kind, arg = cmd
            if kind == "add":
                self._add(arg)
            elif kind == "abort":
                self._abort(arg)
            elif kind == "abort_all":
                self._abort_everything(arg, 503)
            elif kind == "stop":
                self._abort_everything("the server is shutting down", 503)
                return False
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, sub: Submission) -> None:
        added = []
        try:
            for i, (ids, params) in enumerate(zip(sub.prompts, sub.params)):
                self.engine.add_request(ids, params, request_id=sub.rids[i])
                self._tracks[sub.rids[i]] = Track(sub, i, list(params.stop))
                added.append(sub.rids[i])
        except BadInput as e:
            for rid in added:
                self.engine.abort(rid)
                self._tracks.pop(rid, None)
            self._release(len(sub.rids))
            sub.post(Event(0, error=str(e), status=400))

    def _abort(self, sub: Submission) -> None:
        for rid in sub.rids:
            track = self._tracks.pop(rid, None)
            if track is not None:
                self.engine.abort(rid)
                self._release(1)
                self.metrics.observe_finished("abort", time.perf_counter() - sub.arrival)

    def _abort_everything(self, message: str, status: int) -> None:
        subs = {id(t.sub): t.sub for t in self._tracks.values()}
        for sub in subs.values():
            self._abort(sub)
            sub.post(Event(0, error=message, status=status))

    def _release(self, n: int) -> None:
        with self._lock:
            self._reserved -= n

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            log.exception("engine step failed; failing the requests in flight")
            self._abort_everything("the engine failed while serving this request", 500)
            return
        now = time.perf_counter()
        for out in outputs:
            track = self._tracks.get(out.request.request_id)
            if track is not None:
                self._deliver(track, out, now)

    def _deliver(self, track: Track, out: StepOutput, now: float) -> None:
        req, m = out.request, self.metrics
        if track.first_at is None:
            track.first_at = now
            m.observe_first_token(now - track.sub.arrival)
            m.observe_tokens(prompt=len(req.prompt_ids))
        else:
            m.observe_inter_token(now - track.last_at)
        track.last_at = now
        self._count_stats(track, req.stats)
        m.observe_tokens(generation=len(out.new_token_ids))
        if req.finished:
            text = req.stop_text if req.stop_text is not None else self._decode(req.output_ids, req)
            event = Event(track.index, text[track.printed:], list(out.new_token_ids), True, req.finish_reason,
                          stats=req.stats.to_dict(), logprobs=out.new_logprobs)
            del self._tracks[req.request_id]
            self._release(1)
            m.observe_finished(req.finish_reason or "stop", now - track.sub.arrival)
        else:
            self._advance_text(track, req)
            upto = max(track.printed, len(track.text) - held_back(track.text, track.stops))
            event = Event(track.index, track.text[track.printed:upto], list(out.new_token_ids),
                          logprobs=out.new_logprobs)
            track.printed = upto
        track.sub.post(event)

    def _count_stats(self, track: Track, s) -> None:
        drafts, draft_tokens, accepted, per_pos, passes, forced, forced_drafted = track.seen
        new_pos = [n - (per_pos[j] if j < len(per_pos) else 0) for j, n in enumerate(s.accepted_per_position)]
        self.metrics.observe_spec(s.drafts - drafts, s.draft_tokens - draft_tokens, s.accepted_tokens - accepted,
                                  new_pos)
        self.metrics.observe_tokens(passes=s.target_passes - passes)
        self.metrics.observe_forced(s.forced_tokens - forced, s.forced_drafted - forced_drafted)
        track.seen = (s.drafts, s.draft_tokens, s.accepted_tokens, tuple(s.accepted_per_position), s.target_passes,
                      s.forced_tokens, s.forced_drafted)

    def _advance_text(self, track: Track, req) -> None:
        """Extend track.text by decoding only the newest tokens (with one step of context before them).

        Text ending in U+FFFD is half of a multi-byte character: wait for the rest.
        """
        ids = req.output_ids
        before = self._decode(ids[track.prefix_offset:track.read_offset], req)
        now = self._decode(ids[track.prefix_offset:], req)
        if len(now) > len(before) and now.startswith(before) and not now.endswith("\ufffd"):
            track.text += now[len(before):]
            track.prefix_offset, track.read_offset = track.read_offset, len(ids)

    def _decode(self, ids: list[int], req) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=req.params.skip_special_tokens)

    def _update_queue_gauges(self) -> None:
        running = len(self.engine.running)
        self.metrics.set_queue(running, max(0, self.in_flight - running))
