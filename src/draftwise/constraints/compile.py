"""Compile a constraint once per grammar, for one tokenizer, with a time bound.

The grammar engine is llguidance (Microsoft's guidance core, in Rust). Measured on this
project's CPU (AMD EPYC, 2 cores, 2026-12-06; `benchmarks/grammar_engines.py`), on the
Qwen2.5 vocabulary (151,936 tokens) and a four-field JSON schema: the allowed-token mask
took a median 11 us (mean 34 us) per token with llguidance 1.9.1 and 4 us (mean 17 us) with
xgrammar 0.2.8, both far below 1% of a 1.5B model's 37 ms step; compiling the schema took
1.3 ms against 17 ms. llguidance was chosen for what speculation needs beyond the mask:
the forced continuation of a state (`compute_ff_tokens`: a schema's keys, quotes and
braces, which become free draft tokens), rollback, a compile twelve times faster (a tool
call's schema is compiled per request), and no dependencies (xgrammar pulls in triton and
a tensor FFI runtime).

What is cached: the llguidance view of a tokenizer (built once, about 1 s for the Qwen
vocabulary) and, per grammar text, a pristine matcher that each request copies (the same
schema twice compiles once; least recently used out past `CACHE_SIZE`).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from draftwise.constraints.spec import StructuredOutputsParams
from draftwise.errors import BadInput

CACHE_SIZE = 256  # compiled grammars kept
COMPILE_SECONDS = 10.0  # a grammar that takes longer to compile is refused


@dataclass(frozen=True)
class CompiledGrammar:
    """A checked grammar for one tokenizer: `matcher()` gives each request its own state."""

    pristine: object  # llguidance.LLMatcher in its start state, never advanced
    vocab_size: int  # mask width: the model's vocabulary (may exceed the tokenizer's)
    eos_ids: tuple[int, ...]
    special_ids: tuple[int, ...] = ()  # tokens llguidance treats as special, EOS aside (see matcher.py)

    def matcher(self):
        return self.pristine.deep_copy()


# per tokenizer object (dropped with it): its llguidance views, and its compiled grammars
_tokenizers: "weakref.WeakKeyDictionary[object, dict[tuple, object]]" = weakref.WeakKeyDictionary()
_grammars: "weakref.WeakKeyDictionary[object, OrderedDict[tuple, CompiledGrammar]]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def ll_tokenizer(tokenizer, vocab_size: int, eos_ids: Sequence[int]):
    """llguidance's view of a Hugging Face tokenizer (cached per tokenizer object)."""
    return _tokenizer_view(tokenizer, vocab_size, eos_ids)[0]


def _tokenizer_view(tokenizer, vocab_size: int, eos_ids: Sequence[int]):
    """(llguidance's tokenizer, the ids it treats as special other than EOS), cached."""
    import llguidance.hf

    key = (vocab_size, tuple(eos_ids))
    with _lock:
        per = _tokenizers.setdefault(tokenizer, {})
        if key not in per:
            lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos_ids) or None)
            special = tuple(t for t in range(vocab_size) if lltok.is_special_token(t) and t not in eos_ids)
            per[key] = (lltok, special)
        return per[key]


def compile_constraint(spec: StructuredOutputsParams, tokenizer, vocab_size: int, eos_ids: Sequence[int],
                       timeout: float | None = None) -> CompiledGrammar:
    """The compiled grammar of `spec`; BadInput naming what is wrong (an invalid schema,
    regex or grammar, or one that does not compile within `timeout` seconds)."""
    try:
        text = spec.grammar_text()
    except (ValueError, TypeError) as e:
        raise BadInput(f"invalid {spec.describe()}: {_first_line(e)}") from None
    return compile_grammar(text, tokenizer, vocab_size, eos_ids, timeout, spec.describe())


def compile_grammar(text: str, tokenizer, vocab_size: int, eos_ids: Sequence[int],
                    timeout: float | None = None, what: str = "grammar") -> CompiledGrammar:
    """Compile llguidance grammar text (cached; see the module docstring); `timeout`:
    COMPILE_SECONDS when None."""
    timeout = COMPILE_SECONDS if timeout is None else timeout
    key = (vocab_size, tuple(eos_ids), text)
    with _lock:
        cache = _grammars.setdefault(tokenizer, OrderedDict())
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    lltok, special = _tokenizer_view(tokenizer, vocab_size, eos_ids)
    # each compile in its own daemon thread: one that overruns is abandoned (it finishes in
    # the background) and blocks no later compile
    done: list = []
    worker = threading.Thread(target=lambda: done.append(_guarded(text, lltok)), daemon=True,
                              name="draftwise-grammar")
    worker.start()
    worker.join(timeout)
    if not done:
        raise BadInput(f"the {what} did not compile within {timeout:g} s; simplify it")
    matcher, error = done[0]
    if matcher is None:
        raise BadInput(f"invalid {what}: {_first_line(error)}")
    compiled = CompiledGrammar(matcher, vocab_size, tuple(eos_ids), special)
    with _lock:
        cache[key] = compiled
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)
    return compiled


def _guarded(text: str, lltok):
    try:
        return _build(text, lltok)
    except (ValueError, TypeError, RuntimeError) as e:
        return None, str(e)


def _build(text: str, lltok):
    """(the pristine llguidance matcher, "") or (None, the error); runs in a worker thread."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(text, lltok)
    if error and not error.startswith("WARNING"):
        return None, error
    matcher = llguidance.LLMatcher(lltok, text, log_level=0)
    return (None, matcher.get_error()) if matcher.is_error() else (matcher, "")


def cached_grammars(tokenizer) -> int:
    """How many compiled grammars the cache holds for this tokenizer (tests, metrics)."""
    return len(_grammars.get(tokenizer, ()))


def _first_line(e: object) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
