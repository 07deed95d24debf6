"""Sampling settings, and how they turn a model's logits into a distribution.

`SamplingParams` is the typed, validated set of options every request carries. The
functions below apply them (penalties, temperature, top-k, top-p, min-p) and are shared
by plain decoding and by verification, so both sample from the very same distribution.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SamplingParams(BaseModel):
    """Options of one request, in the shape vLLM users know."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_tokens: int = Field(default=128, ge=1, description="new tokens to generate at most")
    temperature: float = Field(default=0.0, ge=0.0, le=100.0, description="0 = greedy")
    top_k: int = Field(default=0, ge=0, description="keep the k most likely tokens; 0 = off")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus mass kept")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0, description="drop tokens below min_p x max prob")
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0, description="HF style, over prompt and output")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="OpenAI style, over output")
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="OpenAI style, over output")
    seed: int | None = Field(default=None, ge=0, description="seed of this request's random stream")
    stop: list[str] = Field(default_factory=list, description="stop strings (not included in the text)")
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
