"""Speculation methods. Importing this package registers every method by name."""

from __future__ import annotations

import importlib

from draftwise.config import SpeculativeConfig
from draftwise.speculators.base import Draft, Proposer, Target, available_methods, proposer_class

_METHOD_MODULES = ("ngram", "suffix", "draft_model", "layer_skip", "medusa", "mtp", "eagle", "adaptive")

for _name in _METHOD_MODULES:  # a method is its module plus this line
    importlib.import_module(f"draftwise.speculators.{_name}")


def build_proposer(config: SpeculativeConfig, target: Target) -> Proposer:
    """The proposer named by `config.method`, built for `target`."""
    from draftwise.errors import BadInput

    try:
        cls = proposer_class(config.method)
    except ValueError as e:
        raise BadInput(str(e)) from None
    return cls.from_config(config, target)


__all__ = ["Draft", "Proposer", "Target", "available_methods", "build_proposer", "proposer_class"]
