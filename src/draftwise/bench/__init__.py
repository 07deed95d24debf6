"""Benchmarking speculative decoding the way the field does (Spec-Bench), and what it saves.

`run_bench` measures plain decoding and each speculator on the same loaded target over a
Spec-Bench style prompt set (greedy, batch 1, chat template, warm-up first) and writes
`results.json`, `results.md` and plots. `cost` turns tokens/s and target passes per token
into dollars per million output tokens, GPUs needed and a monthly bill.
"""

from __future__ import annotations

from draftwise.bench.dataset import Question, load_questions
from draftwise.bench.methods import Method, parse_method, parse_methods
from draftwise.bench.runner import BenchSettings, run_bench

__all__ = ["BenchSettings", "Method", "Question", "load_questions", "parse_method", "parse_methods", "run_bench"]
