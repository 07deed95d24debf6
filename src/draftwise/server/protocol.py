"""Request bodies of the OpenAI-compatible API, validated with pydantic.

Unknown fields are refused (400 "unrecognized request argument") rather than silently
ignored; a few harmless OpenAI fields (`user`, `store`, `metadata`, ...) are accepted and
ignored. Options this server cannot honour exactly (echo, tools, ...) are
accepted by the schema and refused by `unsupported()` with a clear 400.
Extensions, as in vLLM: top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids, min_tokens,
include_stop_str_in_output, skip_special_tokens,
return_token_ids; draftwise's own: sampling ("coupled", the default with a seed, or "rejection", the
default without).

Client strings are checked in one place (`ClientModel`): a lone surrogate (JSON allows
`"\ud800"`, which is no Unicode text) is refused with a 400 before anything tries to
tokenize, log or echo it. Types are strict where JSON has the type (booleans must be
true/false, not "yes").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

from draftwise.sampling import MAX_LOGPROBS

MAX_N = 64


def has_surrogate(value: object) -> bool:
    """Does a string anywhere in this value (lists, dicts, models) hold a lone surrogate?"""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, (list, tuple)):
        return any(has_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(has_surrogate(k) or has_surrogate(v) for k, v in value.items())
    if isinstance(value, BaseModel):
        return any(has_surrogate(v) for v in value.__dict__.values())
    return False


class ClientModel(BaseModel):
    """Base of every request body: refuses text that is not valid Unicode."""

    @model_validator(mode="after")
    def _valid_text(self):
        for name, value in self.__dict__.items():
            if has_surrogate(value):
                raise ValueError(f"{name} holds invalid Unicode (a lone surrogate); send valid UTF-8 text")
        return self


class StreamOptions(ClientModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = None  # accepted, ignored
    continuous_usage_stats: StrictBool | None = None  # vLLM's; accepted, ignored


class SamplingFields(ClientModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(default=None)
    seed: StrictInt | None = Field(default=None, ge=0, lt=2**63)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (vLLM names)
    top_k: StrictInt | None = Field(default=None, ge=-1, description="-1 or 0 = off")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    min_tokens: StrictInt = Field(default=0, ge=0)
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    return_token_ids: StrictBool = False
    sampling: Literal["coupled", "rejection"] | None = None  # draftwise: how sampled tokens are drawn

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids (got {key!r})")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100] (got {bias})")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v: object) -> object:
        if v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            return v
        raise ValueError("stop must be a string or a list of strings")

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) of the first option this server refuses, else None."""
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        if self.stop is not None and isinstance(self.stop, list) and len(self.stop) > 16:
            return "stop", "at most 16 stop strings"
        return None

    def logprob_count(self) -> int | None:
        """Alternatives per token to return with log-probabilities; None = no logprobs."""
        return None


def _is_ids(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    suffix: str | None = None
    best_of: StrictInt | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, v: object) -> object:
        if isinstance(v, str) or _is_ids(v):
            return v
        if isinstance(v, list) and v and (all(isinstance(x, str) for x in v) or all(_is_ids(x) for x in v)):
            return v
        raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of such lists")

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported by this server"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported by this server"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of is not supported by this server (use n)"
        return super().unsupported()

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: text, or token ids."""
        p = self.prompt
        if isinstance(p, str) or not p:
            return [p]  # an empty prompt is refused later with a clear message
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ContentPart(ClientModel):
    """A part of a message's content; only text parts are served (`unsupported()` refuses
    images, audio, files with `unsupported_parameter`)."""

    model_config = ConfigDict(extra="allow")

    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(ClientModel):
    model_config = ConfigDict(extra="ignore")  # replayed assistant messages carry refusal, audio, ...

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)

    def unsupported_part(self) -> str | None:
        """Why this message's content cannot be served, else None."""
        for part in self.content if isinstance(self.content, list) else []:
            if part.type != "text":
                return f"content parts of type {part.type!r} are not supported by this server (text only)"
            if part.text is None:
                return "a text content part needs its text"
        return None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    store: StrictBool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        for m in self.messages:
            if (why := m.unsupported_part()) is not None:
                return "messages", why
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs set to true"
        if self.tools or self.functions or self.tool_choice not in (None, "none") or self.function_call is not None:
            return "tools", "tools / function calling are not supported by this server"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", "only response_format {\"type\": \"text\"} is supported"
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            return "max_completion_tokens", "give max_completion_tokens or max_tokens, not both"
        return super().unsupported()

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(ClientModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True


class DetokenizeRequest(ClientModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[StrictInt]
