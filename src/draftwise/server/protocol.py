"""Request bodies of the OpenAI-compatible API, validated with pydantic.

Unknown fields are refused (400 "unrecognized request argument") rather than silently
ignored; a few harmless OpenAI fields (`user`, `store`, `metadata`, ...) are accepted and
ignored. Options this server cannot honour exactly (echo, suffix, ...) are
accepted by the schema and refused by `unsupported()` with a clear 400.

Structured output comes in OpenAI's and vLLM's spellings (`response_format`,
`structured_outputs`, the older `guided_json` / `guided_regex` / `guided_choice` /
`guided_grammar`); `SamplingFields.structured()` translates whichever one is given into a
`StructuredOutputsParams`, naming the field when it is wrong (`BadField`).
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

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator,
                      model_validator)

from draftwise.config import one_line
from draftwise.constraints import StructuredOutputsParams
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


class BadField(ValueError):
    """A request field that is wrong; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


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
    # structured output: OpenAI's, vLLM's, and vLLM's older spellings (at most one)
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: StrictStr | dict[str, Any] | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None
    guided_whitespace_pattern: StrictStr | None = None
    guided_decoding_backend: StrictStr | None = None

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

    def structured(self) -> tuple[StructuredOutputsParams | None, str | None]:
        """(the constraint the request asks for, the field it came from); (None, None) when
        none. BadField when a field is malformed or more than one is given."""
        given: list[tuple[str, StructuredOutputsParams]] = []
        if self.response_format is not None and (c := _response_format(self.response_format)) is not None:
            given.append(("response_format", c))
        if self.structured_outputs is not None:
            try:
                given.append(("structured_outputs", StructuredOutputsParams(**self.structured_outputs)))
            except (ValidationError, TypeError) as e:
                raise BadField("structured_outputs", f"structured_outputs: {_why(e)}") from None
        for name, kind in GUIDED.items():
            value = getattr(self, name)
            if value is None:
                continue
            extra = {"backend": self.guided_decoding_backend}
            if kind == "json" and self.guided_whitespace_pattern is not None:
                extra["whitespace_pattern"] = self.guided_whitespace_pattern
            try:
                given.append((name, StructuredOutputsParams(**{kind: value}, **extra)))
            except ValidationError as e:
                raise BadField(name, f"{name}: {_why(e)}") from None
        if self.guided_whitespace_pattern is not None and self.guided_json is None:
            raise BadField("guided_whitespace_pattern", "guided_whitespace_pattern applies to guided_json only")
        if len(given) > 1:
            names = ", ".join(n for n, _ in given)
            raise BadField(given[1][0], f"give one structured output constraint, not several (got {names})")
        return given[0][1] if given else None, given[0][0] if given else None


def _is_ids(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def _why(e: Exception) -> str:
    return one_line(e).removeprefix("value: ").replace("Value error, ", "") if isinstance(e, ValidationError) \
        else str(e)


def _response_format(rf: dict[str, Any]) -> StructuredOutputsParams | None:
    """OpenAI's response_format as a constraint (None for text). `strict` is accepted either
    way: a constrained answer always follows the schema exactly."""
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise BadField("response_format", f"response_format type must be text, json_object or json_schema "
                                          f"(got {kind!r})")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise BadField("response_format", 'response_format json_schema needs {"name": ..., "schema": {...}}')
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise BadField("response_format", "response_format json_schema.strict must be true or false")
    return StructuredOutputsParams(json=spec["schema"])


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
    tool_calls: list[dict[str, Any]] | None = None  # an assistant message's calls, replayed
    tool_call_id: str | None = None  # a tool message: the call it answers

    @field_validator("tool_calls")
    @classmethod
    def _check_calls(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for call in v or []:
            fn = call.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                    or not isinstance(fn.get("arguments", "{}"), (str, dict)):
                raise ValueError('each tool call is {"id", "type": "function", "function": {"name", "arguments"}}')
        return v

    def as_dict(self) -> dict[str, Any]:
        """The message as the chat template gets it (developer is system)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

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
        if self.functions or self.function_call is not None:
            return "functions", "functions / function_call (deprecated) are not supported by this server; use tools"
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
