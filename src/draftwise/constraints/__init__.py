"""Constraints on a request's output (structured output, tool calls), below the speculators.

The front door: a constraint is described by `StructuredOutputsParams` (spec.py), compiled
once per grammar (compile.py), followed per request by a `Matcher` (matcher.py), and a
draft is fitted to it before verification (`fit_draft`, draft.py). No speculator knows
which grammar engine is used: the engine fits their drafts, `sampling.py` applies the
masks to the target's logits.
"""

from draftwise.constraints.compile import CompiledGrammar, cached_grammars, compile_constraint, compile_grammar
from draftwise.constraints.draft import FittedDraft, fit_draft
from draftwise.constraints.matcher import Matcher
from draftwise.constraints.spec import GuidedDecodingParams, StructuredOutputsParams

__all__ = [
    "CompiledGrammar", "FittedDraft", "GuidedDecodingParams", "Matcher", "StructuredOutputsParams",
    "cached_grammars", "compile_constraint", "compile_grammar", "fit_draft",
]
