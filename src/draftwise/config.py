"""Typed configuration of speculation, validated with a clear message on bad values."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from draftwise.errors import BadInput
from draftwise.tree import order_parent_first


class LearnerConfig(BaseModel):
    """adaptive: the EAGLE head learned online from served traffic (speculators/adaptive/online.py)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="learn online (false: no learned head at all)")
    init: str | None = Field(default="auto", description="head to start from: a shipped head name or folder; "
                             "null: a new head; auto: the shipped head made for the target if there is one")
    train_threads: int = Field(default=1, ge=1, le=256, description="CPU threads the trainer thread uses")
    train_every: int = Field(default=2, ge=1, description="engine steps per training step at most")
    train_share: float | None = Field(default=None, ge=0, le=1, description="most share of wall time spent "
                                      "training while requests run (0: learn only while idle; default: 0.1 on "
                                      "a GPU or a CPU of more than 4 cores, else 0: on a small CPU a training "
                                      "step takes a core serving needs, see docs/adaptive.md)")
    train_when_idle: bool = Field(default=True, description="train freely while no request runs")
    buffer_tokens: int = Field(default=16384, ge=64, description="replay buffer size, tokens of recent traffic")
    min_tokens: int = Field(default=64, ge=1, description="tokens in the buffer before training starts")
    batch_size: int = Field(default=4, ge=1, le=256)
    max_len: int = Field(default=256, ge=8, le=8192, description="longest training window, tokens")
    lr: float | None = Field(default=None, gt=0, lt=1, description="learning rate (default: 3e-5 from a trained "
                             "head, which a larger rate unlearns within a hundred steps; 1e-3 for a new head)")
    warmup: int = Field(default=20, ge=0, description="training steps over which the rate ramps up")
    ttt_steps: int = Field(default=2, ge=1, le=8, description="training-time-test unroll steps")
    swap_every: int = Field(default=4, ge=1, description="training steps between weight swaps")
    save_every: int = Field(default=25, ge=1, description="swaps between saves of the adaptive state")


VLLM_METHODS = {"eagle3": "eagle", "deepseek_mtp": "mtp", "mtp": "mtp"}  # vLLM's method names -> ours


class SpeculativeConfig(BaseModel):
    """What to speculate with, in the shape of vLLM's `speculative_config`."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="speculator name: draft_model, ngram, suffix, ...")
    model: str | None = Field(default=None, description="draft model / head: bundled name or path")
    draft_quantization: str | None = Field(
        default=None, description="draft_model: quantization of the draft model (none, w8a8-all, w4a8-all, ...; "
                                  "default: none for an unquantized target, w4a8-all beside a w4a8 one, else w8a8-all)")
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
    lookup: Literal["ngram", "suffix"] | None = Field(
        default=None, description="eagle: also graft this lookup method's draft onto the head's tree, its "
                                  "nodes scored by its measured acceptance (default: none)")
    num_layers: int | None = Field(default=None, ge=1, description="layer_skip: target layers the draft runs (None = calibrate)")
    static: SpeculativeConfig | None = Field(
        default=None, description="adaptive: the static speculator (any other method; default: the shipped "
                                  "EAGLE head of the target if there is one, else ngram)")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="adaptive: the online-learned head")
    parts: list[Literal["static", "learner", "suffix"]] | None = Field(
        default=None, min_length=1, description="adaptive: the parts that may draft (default: all three; "
                                                "e.g. [\"learner\"] measures the learned head alone)")
    adaptive_state: str | None = Field(default=None, description="adaptive: folder where the learned head and "
                                       "the controller's estimates are saved and resumed from")
    tree: list[list[int]] | None = Field(
        default=None, description="tree proposers (medusa): choice paths, top-i per depth, e.g. [[0], [0, 0], [1]]")

    @model_validator(mode="before")
    @classmethod
    def _vllm_names(cls, data: Any) -> Any:
        """vLLM's spellings: no method with a model means a draft model, "[ngram]" as the
        model means ngram, eagle3 / deepseek_mtp name our eagle / mtp, a draft tensor
        parallel size of 1 is what runs here."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("model") == "[ngram]":
            data.pop("model")
            data.setdefault("method", "ngram")
        if "method" not in data and data.get("model"):
            data["method"] = "draft_model"
        if isinstance(data.get("method"), str):
            data["method"] = VLLM_METHODS.get(data["method"], data["method"])
        if data.get("draft_tensor_parallel_size", 1) == 1:
            data.pop("draft_tensor_parallel_size", None)
        return data

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
        if self.lookup is not None and self.method != "eagle":
            raise ValueError(f"lookup (a lookup draft grafted onto a head's tree) needs method eagle, not {self.method!r}")
        if self.static is not None and self.static.method == "adaptive":
            raise ValueError("static: an adaptive speculator cannot be the static part of another")
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
