"""Typed configuration of speculation, validated with a clear message on bad values."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from draftwise.errors import BadInput
from draftwise.tree import order_parent_first


class SpeculativeConfig(BaseModel):
    """What to speculate with, in the shape of vLLM's `speculative_config`."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="speculator name: draft_model, ngram, suffix, ...")
    model: str | None = Field(default=None, description="draft model / head: bundled name or path")
    draft_quantization: str | None = Field(
        default=None, description="draft_model: quantization of the draft model (none, w8a8-all, w4a8-all, ...; "
                                  "default: none for an unquantized target, else DEFAULT_DRAFT_QUANTIZATION)")
    num_speculative_tokens: int = Field(default=4, ge=0, le=64, description="draft length (max when adaptive)")
    adaptive: bool | None = Field(default=None, description="adapt the draft length (chains) or the tree's "
                                  "node budget (eagle, medusa) from measured acceptance and costs, 0 included "
                                  "(default: yes; no = always num_speculative_tokens)")
    prompt_lookup_min: int = Field(default=1, ge=1, le=16)
    prompt_lookup_max: int = Field(default=4, ge=1, le=16)
    suffix_max_depth: int = Field(default=64, ge=1, le=1024, description="longest suffix the suffix cache matches")
    suffix_max_cached_requests: int = Field(default=10000, ge=0, description="finished requests the suffix cache keeps")
    eagle_tree_top_k: int = Field(default=4, ge=1, le=64, description="eagle: children expanded per node and nodes expanded per depth")
    eagle_tree_depth: int = Field(default=5, ge=1, le=32, description="eagle: draft tree depth (head passes per step)")
    eagle_total_tokens: int | None = Field(default=None, ge=1, le=256,
                                           description="eagle: tree nodes kept for verification (default: num_speculative_tokens)")
    num_layers: int | None = Field(default=None, ge=1, description="layer_skip: target layers the draft runs (None = calibrate)")
    tree: list[list[int]] | None = Field(
        default=None, description="tree proposers (medusa): choice paths, top-i per depth, e.g. [[0], [0, 0], [1]]")

    @model_validator(mode="after")
    def _check(self) -> "SpeculativeConfig":
        from draftwise.models.quantize import QUANTIZATIONS  # same layer; lazy keeps config import light

        if self.draft_quantization is not None and self.draft_quantization not in QUANTIZATIONS:
            raise ValueError(f"draft_quantization {self.draft_quantization!r} does not exist; "
                             f"choose one of: {', '.join(QUANTIZATIONS)}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min must be <= prompt_lookup_max")
        if self.tree is not None:
            order_parent_first(self.tree)  # ValueError with the reason
        return self


def parse_speculative_config(value: str | dict[str, Any] | SpeculativeConfig | None) -> SpeculativeConfig | None:
    """Accept a JSON string, a dict or a config; raise BadInput with a one-line reason."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    try:
        data = json.loads(value) if isinstance(value, str) else value
        return SpeculativeConfig.model_validate(data)
    except json.JSONDecodeError as e:
        raise BadInput(f"--speculative-config is not valid JSON: {e}") from None
    except ValidationError as e:
        raise BadInput(f"bad speculative config: {one_line(e)}") from None


def one_line(e: ValidationError) -> str:
    """A pydantic error as one readable line: `field: message; ...`."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "value"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)
