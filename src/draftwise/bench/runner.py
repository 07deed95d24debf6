"""Run a benchmark: every method over every question, one generation at a time.

Spec-Bench protocol by default: greedy, batch 1, the model's chat template, a warm-up
generation (on a prompt of its own) before each method's first measured one, and plain
decoding measured in the same run on the same loaded target (speculators are switched
with `llm.with_speculation`: one engine per method, sharing the target's weights).
A multi-turn question runs as a conversation: each method's own answer to turn 1 is in
the history of turn 2. Every finished generation is appended to `records.jsonl` at once,
and finished (question_id, turn, method) triples are skipped when the run is restarted.
By default one method runs over all questions, then the next; `interleave` alternates
the methods question by question.

Only the method being timed may work: every other engine's background work (an adaptive
learner's training) is held while it runs, so no method is timed on a machine another
one is loading. The run checks itself: plain decoding of a fixed prompt is timed at its
start and end (the probe: the median of `PROBE_REPEATS` generations at each end), and a
drift beyond `PROBE_DRIFT` is reported in the notes and on stderr as a sign that
something else took the machine.
"""

from __future__ import annotations

import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from draftwise.bench.dataset import Question
from draftwise.bench.methods import Method
from draftwise.bench.records import RecordStore
from draftwise.bench.settings import BenchSettings, Generate, Generation
from draftwise.errors import BadInput
from draftwise.sampling import SamplingParams

WARMUP_TOKENS = 16
# The warm-up runs on a prompt of its own: warmed up on the question itself, an engine that
# remembers (llama.cpp's prompt cache, a suffix cache of served requests) would answer the
# measured run partly from the warm-up.
WARMUP_MESSAGES = [{"role": "user", "content": "Name the days of the week, one per line."}]
PROBE_MESSAGES = [{"role": "user", "content": "Count from one to fifty in words, separated by commas."}]
PROBE_TOKENS = 32  # generated whatever the model says (ignore_eos), so start and end time the same work
PROBE_REPEATS = 3  # the median of three at each end: one 32-token generation alone varies by ~10%
PROBE_DRIFT = 0.15  # beyond the run-to-run noise measured on these machines


def draftwise_generate(llm) -> Generate:
    """Generate with the LLM's current speculation; keep the raw per-request counters."""

    def generate(prompt_ids: list[int], messages: list[dict[str, str]], params: SamplingParams) -> Generation:
        seen: dict[str, Any] = {}

        def grab(out) -> None:
            seen["request"] = out.request

        out = llm.generate([prompt_ids], params, on_output=grab)[0]
        req = seen.get("request")
        st = req.stats if req is not None else None
        stats = None if st is None else {
            "target_passes": st.target_passes, "output_tokens": st.output_tokens, "drafts": st.drafts,
            "draft_tokens": st.draft_tokens, "accepted_tokens": st.accepted_tokens,
            "accepted_per_position": list(st.accepted_per_position),
            "drafted_per_position": list(st.drafted_per_position),
            "draft_seconds": round(st.draft_seconds, 6), "verify_seconds": round(st.verify_seconds, 6),
        }
        return Generation(list(out.token_ids), out.text, float(out.stats.get("seconds", 0.0)),
                          out.finish_reason, stats)

    return generate


def build_prompt(llm, messages: list[dict[str, str]], chat_template: bool) -> list[int]:
    if chat_template:
        return llm.chat_prompt(messages)
    return llm.encode_prompt("\n\n".join(m["content"] for m in messages))


def sampling_for(settings: BenchSettings, question: Question, turn: int, max_tokens: int | None = None) -> SamplingParams:
    seed = None if settings.temperature == 0 else zlib.crc32(f"{question.question_id}/{turn}".encode())
    return SamplingParams(max_tokens=max_tokens or settings.max_tokens, temperature=settings.temperature, seed=seed,
                          sampling=settings.sampling)


def probe_plain(llm, settings: BenchSettings) -> float:
    """Tokens per second of plain greedy decoding of `PROBE_TOKENS` tokens of a fixed prompt
    (`llm` decodes without speculation), wall time of the whole generation."""
    prompt = build_prompt(llm, PROBE_MESSAGES, settings.chat_template)
    params = SamplingParams(temperature=0.0, max_tokens=PROBE_TOKENS, ignore_eos=True)
    start = time.perf_counter()
    out = llm.generate([prompt], params)[0]
    return len(out.token_ids) / max(time.perf_counter() - start, 1e-9)


def probe_note(start: float, end: float) -> tuple[str, bool]:
    """The probe's line for the notes, and whether it drifted beyond `PROBE_DRIFT`."""
    drift = end / start - 1.0
    line = (f"plain probe ({PROBE_TOKENS} tokens of a fixed prompt, median of {PROBE_REPEATS}): {start:.2f} "
            f"tokens/s at the start of this run, {end:.2f} at its end ({drift:+.1%})")
    if abs(drift) > PROBE_DRIFT:
        return line + f": beyond the {PROBE_DRIFT:.0%} noise, so something else loaded the machine during the run " \
                      "and its timings are suspect", True
    return line, False


def pending(store: RecordStore, questions: Sequence[Question], label: str) -> int:
    return sum(store.get(q.question_id, t, label) is None for q in questions for t in range(len(q.turns)))


def run_method(
    llm, generate: Generate, method: Method, questions: Sequence[Question], settings: BenchSettings,
    store: RecordStore, bar: tqdm, on_record: Callable[[dict], None] | None = None,
) -> None:
    """All turns of all questions for one method, skipping those already recorded."""
    warm = not settings.warmup
    for q in questions:
        messages: list[dict[str, str]] = []
        failed: str | None = None
        for turn, user_text in enumerate(q.turns):
            messages.append({"role": "user", "content": user_text})
            done = store.get(q.question_id, turn, method.label)
            if done is not None:
                failed = done.get("error")
                messages.append({"role": "assistant", "content": done.get("text", "")})
                continue
            record = base_record(q, turn, method)
            if failed is None:
                try:
                    prompt = build_prompt(llm, messages, settings.chat_template)
                    if not warm:
                        generate(build_prompt(llm, WARMUP_MESSAGES, settings.chat_template), list(WARMUP_MESSAGES),
                                 sampling_for(settings, q, turn, WARMUP_TOKENS))
                        warm = True
                    gen = generate(prompt, list(messages), sampling_for(settings, q, turn))
                except BadInput as e:  # e.g. the conversation outgrew the context window
                    failed = str(e)
                else:
                    record.update(prompt_tokens=len(prompt), output_tokens=len(gen.token_ids),
                                  seconds=round(gen.seconds, 6),
                                  tokens_per_second=round(len(gen.token_ids) / gen.seconds, 4) if gen.seconds > 0 else 0.0,
                                  finish_reason=gen.finish_reason, stats=gen.stats, text=gen.text,
                                  token_ids=gen.token_ids, **gen.extra)
            if failed is not None:
                record.update(error=failed, text="", token_ids=[])
                print(f"warning: {method.label} question {q.question_id} turn {turn + 1}: {failed}", file=sys.stderr)
            store.add(record)
            messages.append({"role": "assistant", "content": record["text"]})
            bar.update(1)
            if on_record is not None:
                on_record(record)


def base_record(q: Question, turn: int, method: Method) -> dict[str, Any]:
    return {"question_id": q.question_id, "category": q.category, "group": q.group, "turn": turn,
            "method": method.label, "kind": method.kind, "config": method.config_dict()}


def run_bench(
    llm, questions: Sequence[Question], methods: Sequence[Method], out_dir: str | Path,
    settings: BenchSettings, *, progress: bool = True, plots: bool = True,
    on_record: Callable[[dict], None] | None = None, interleave: bool = False, probe: bool = True,
) -> dict[str, Any]:
    """Measure every method (plain first), then write results.json, results.md and plots.

    `llm` is a `draftwise.LLM` (built by name, or `LLM.from_model` in tests). Returns the
    results dictionary written to results.json. `on_record` is called after each record is
    saved (progress hooks; tests use it to simulate an interruption). `interleave` runs
    every method on one question before going to the next, instead of one method over all
    questions, so a drift in the machine's speed during the run hits all methods alike
    (each method then warms up, and each peer loads, once per question). `probe` times plain
    decoding at the start and end of the run (module docstring).
    """
    from draftwise.bench import peers as peer_engines
    from draftwise.bench.report import write_reports

    if not methods or methods[0].label != "plain":
        raise BadInput("the first method must be plain decoding (the baseline)")
    store = RecordStore(out_dir, settings.fingerprint())
    for m in methods:
        store.check_method(m.label, m.config_dict())
    notes: list[str] = []
    todo = {m.label: pending(store, questions, m.label) for m in methods}
    started = time.time()
    rounds = [[q] for q in questions] if interleave else [list(questions)]
    skipped: set[str] = set()
    engines = Engines(llm)
    probes: list[float] = []

    def probe_now() -> float:
        plain = engines.timing(methods[0])
        return statistics.median(probe_plain(plain, settings) for _ in range(PROBE_REPEATS))

    try:
        if probe and sum(todo.values()):
            probe_plain(engines.timing(methods[0]), settings)  # a first generation pays one-time costs
            probes.append(probe_now())
        with tqdm(total=sum(todo.values()), unit="gen", disable=not progress, dynamic_ncols=True) as bar:
            for part in rounds:
                for m in methods:
                    if m.label in skipped or pending(store, part, m.label) == 0:
                        continue
                    bar.set_description(m.label)
                    if m.peer:
                        engines.hold_all()
                        try:
                            peer = peer_engines.make_peer(m.peer, llm, methods, settings)
                        except peer_engines.PeerUnavailable as e:
                            notes.append(f"{m.label}: skipped ({e})")
                            print(f"note: peer {m.label} skipped: {e}", file=sys.stderr)
                            skipped.add(m.label)
                            bar.total -= pending(store, questions, m.label)
                            bar.refresh()
                            continue
                        try:
                            run_method(llm, peer.generate, m, part, settings, store, bar, on_record)
                        finally:
                            peer.close()
                    else:
                        e = engines.timing(m)
                        run_method(e, draftwise_generate(e), m, part, settings, store, bar, on_record)
        if probes:
            probes.append(probe_now())
            line, drifted = probe_note(*probes)
            notes.append(line)
            if drifted:
                print(f"warning: {line}", file=sys.stderr)
    finally:
        engines.close()
    notes += peer_engines.standing_notes(methods)
    return write_reports(store.all(), methods, questions, settings, Path(out_dir), notes=notes,
                         seconds=time.time() - started, plots=plots)


class Engines:
    """One engine per draftwise method on the shared target (its draft model loaded once,
    kept across rounds), made on first use. Only the method being timed may do background
    work: `timing(m)` holds every other engine's (an adaptive learner's training) and lets
    m's go on."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.by_label: dict[str, Any] = {}

    def timing(self, m: Method):
        """m's engine, the only one whose background work may run from now."""
        if m.label not in self.by_label:
            self.by_label[m.label] = self.llm.with_speculation(m.config)
        for label, e in self.by_label.items():
            if label != m.label:
                e.pause_background()
        engine = self.by_label[m.label]
        engine.resume_background()
        return engine

    def hold_all(self) -> None:
        for e in self.by_label.values():
            e.pause_background()

    def close(self) -> None:
        """Stop every engine's background work (an adaptive state is saved)."""
        for e in self.by_label.values():
            e.close()
        self.by_label.clear()
