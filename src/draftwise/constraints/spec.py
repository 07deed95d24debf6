"""What a request's output must match: a JSON schema, a regex, a choice or a grammar.

`StructuredOutputsParams` is vLLM's shape (`SamplingParams(structured_outputs=...)`; the
older `GuidedDecodingParams` is the same class). Exactly one of `json`, `regex`,
`choice`, `grammar`, `json_object` is set. `grammar_text()` turns it into the grammar
engine's text (llguidance; see `constraints/compile.py` for why that one).

JSON layout: by default a schema's JSON is written on one line with Python's separators
(`", "` between items, `": "` after keys), the way models commonly write JSON; with no free
whitespace the keys, quotes and braces of a schema are forced tokens, which speculation
gets for free. `whitespace_pattern` (a regex) allows free whitespace instead.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

KINDS = ("json", "regex", "choice", "grammar", "json_object")

# llguidance's JSON options: one-line JSON, Python's separators (see the module docstring)
JSON_LAYOUT: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


warnings.filterwarnings("ignore", message='Field name "json" in "StructuredOutputsParams"', category=UserWarning)


class StructuredOutputsParams(BaseModel):
    """A constraint on a request's output (vLLM's `StructuredOutputsParams` fields; `json`
    is vLLM's field name, though it shadows pydantic's deprecated `BaseModel.json`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    json: str | dict[str, Any] | None = Field(default=None, description="a JSON schema (object or its text)")
    regex: str | None = Field(default=None, description="the output matches this regular expression")
    choice: list[str] | None = Field(default=None, description="the output is one of these strings")
    grammar: str | None = Field(default=None, description="a Lark or GBNF grammar (llguidance syntax)")
    json_object: bool | None = Field(default=None, description="any JSON object")
    whitespace_pattern: str | None = Field(default=None, description="regex of the whitespace allowed between "
                                                                     "JSON tokens (default: none, one-line JSON)")
    disable_any_whitespace: bool = Field(default=False, description="vLLM's flag; one-line JSON is the default "
                                                                    "here anyway")
    disable_additional_properties: bool = Field(default=False, description="objects take no keys the schema "
                                                                           "does not name")
    disable_fallback: bool = Field(default=False, description="accepted; there is no fallback engine")
    backend: str | None = Field(default=None, description="accepted when 'auto', 'guidance' or 'llguidance'")

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutputsParams":
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)} (got {', '.join(given) or 'none'})")
        if self.choice is not None and (not self.choice or any(not c for c in self.choice)):
            raise ValueError("choice needs at least one non-empty string")
        if self.backend not in (None, "auto", "guidance", "llguidance"):
            raise ValueError(f"backend {self.backend!r} is not available: draftwise uses llguidance")
        if self.whitespace_pattern is not None and self.kind not in ("json", "json_object"):
            raise ValueError("whitespace_pattern applies to json and json_object only")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def schema(self) -> dict[str, Any]:
        """The JSON schema (json or json_object); ValueError if the text is not JSON."""
        if self.json_object:
            return {"type": "object"}
        if isinstance(self.json, dict):
            schema = dict(self.json)
        else:
            try:
                schema = json.loads(self.json)  # type: ignore[arg-type]
            except json.JSONDecodeError as e:
                raise ValueError(f"json is not a JSON schema: {e}") from None
            if not isinstance(schema, dict):
                raise ValueError("json must be a JSON schema object")
        if self.disable_additional_properties:
            schema = _no_additional_properties(schema)
        return schema

    def grammar_text(self) -> str:
        """The llguidance grammar for this constraint (compiled and checked in `compile.py`)."""
        import llguidance

        if self.kind in ("json", "json_object"):
            layout = dict(JSON_LAYOUT)
            if self.whitespace_pattern is not None:
                layout = {"whitespace_flexible": True, "whitespace_pattern": self.whitespace_pattern}
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(self.schema()), layout)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.regex)
        if self.kind == "choice":
            return llguidance.grammar_from("choice", json.dumps(self.choice))
        return llguidance.grammar_from("grammar", self.grammar)  # type: ignore[arg-type]

    def describe(self) -> str:
        """Which request parameter this came from, for error messages."""
        return {"json": "json schema", "json_object": "json_object", "regex": "regex", "choice": "choice",
                "grammar": "grammar"}[self.kind]


GuidedDecodingParams = StructuredOutputsParams  # vLLM's older name


def _no_additional_properties(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that does not set it."""
    if isinstance(schema, list):
        return [_no_additional_properties(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _no_additional_properties(v) for k, v in schema.items()}
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
    return out
