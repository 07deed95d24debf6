"""Tool calls in one format, for every model: what the server and `LLM.chat` share.

The format is Qwen2.5's (the bundled Qwen models' chat template renders the tools and
expects it): each call is a block

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

with text before, between or after the blocks being the answer's content.

- `plan_tools` checks a request's `tools` / `tool_choice` / `parallel_tool_calls` and
  returns a `ToolPlan` (ToolInputError, a BadInput naming the parameter, when they are wrong).
- `ToolPlan.constraint(tokenizer)`: for `required` and a named function, the grammar that
  enforces the calls (a Lark grammar with each function's parameters inline as `%json`, the JSON on
  one line as every schema here, constraints/spec.py); None for `auto` (the model chooses
  text or calls) and `none` (the tools are not shown to the model).
- The prompt: a template that renders `tools` gets them (`template_messages` turns replayed
  calls' argument strings into objects, as templates expect); a template without tool
  support (`renders_tools` says which: the text does not change when tools are passed) gets
  `fallback_messages`: the tools described in a system message (merged into the first
  one), replayed calls written as the blocks above, tool results as user messages.
- `ToolCallParser` splits an answer into content and calls as it streams (text that may
  begin a block is held back until the next text decides); `parse_tool_calls` does it at
  once, with the same result. A block that is not a call of a given tool (bad JSON, an
  unknown name) stays content.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from draftwise.constraints.spec import JSON_LAYOUT, StructuredOutputsParams
from draftwise.errors import BadInput

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MODES = ("auto", "none", "required")
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # OpenAI: parameters omitted

FALLBACK_PROMPT = """You can call functions (tools) to answer. They are described here, one JSON object a line:
{tools}

To call a function, answer with a block like this, one block per call:
<tool_call>
{{"name": "<the function's name>", "arguments": {{<the arguments, as a JSON object>}}}}
</tool_call>
The result of each call comes back in a <tool_response> block. Answer with text when no function is needed."""


class ToolInputError(BadInput):
    """Bad `tools` / `tool_choice`; `param` names the request parameter."""

    def __init__(self, message: str, param: str = "tools") -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolPlan:
    """A request's checked tools and how they are to be used."""

    tools: list[dict[str, Any]]  # OpenAI function tools, normalized: {"type", "function": {name, parameters, ...}}
    mode: str  # "auto", "none", "required" or "named"
    name: str | None = None  # the function tool_choice names
    parallel: bool = True  # several calls in one answer

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t["function"]["name"] for t in self.tools)

    @property
    def prompt_tools(self) -> list[dict[str, Any]] | None:
        """The tools the prompt shows the model (none for tool_choice "none")."""
        return None if self.mode == "none" else self.tools

    @property
    def parses(self) -> bool:
        return self.mode != "none"

    def constraint(self, tokenizer=None) -> StructuredOutputsParams | None:
        """The grammar enforcing the calls (required, named), else None; with the model's
        `tokenizer`, markers it holds as single tokens are written as those tokens."""
        if self.mode not in ("required", "named"):
            return None
        tools = [t for t in self.tools if self.mode == "required" or t["function"]["name"] == self.name]
        return StructuredOutputsParams(grammar=tool_grammar(tools, self.parallel and self.mode == "required",
                                                            marker_tokens(tokenizer)))


def plan_tools(tools: Sequence[Any] | None, tool_choice: Any = None,
               parallel_tool_calls: bool | None = None) -> ToolPlan | None:
    """Check the OpenAI tool fields; None when the request uses no tools."""
    if not tools:
        if tool_choice in (None, "none"):
            return None
        raise ToolInputError("tool_choice needs tools", "tool_choice")
    if not isinstance(tools, (list, tuple)):
        raise ToolInputError("tools must be a list of function tools")
    checked = [_check_tool(t, i) for i, t in enumerate(tools)]
    names = [t["function"]["name"] for t in checked]
    if len(set(names)) != len(names):
        raise ToolInputError(f"tools: two functions share a name ({_duplicate(names)!r})")
    parallel = True if parallel_tool_calls is None else parallel_tool_calls
    if tool_choice is None:
        return ToolPlan(checked, "auto", parallel=parallel)
    if isinstance(tool_choice, str):
        if tool_choice not in MODES:
            raise ToolInputError(f"tool_choice must be one of {', '.join(MODES)} or a named function "
                                 f"(got {tool_choice!r})", "tool_choice")
        return ToolPlan(checked, tool_choice, parallel=parallel)
    name = None
    if isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function":
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise ToolInputError('a named tool_choice is {"type": "function", "function": {"name": ...}}', "tool_choice")
    if name not in names:
        raise ToolInputError(f"tool_choice names {name!r}, which is not one of the tools "
                             f"({', '.join(names)})", "tool_choice")
    return ToolPlan(checked, "named", name, parallel)


def _check_tool(tool: Any, i: int) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise ToolInputError(f"{where} must be an object")
    if tool.get("type", "function") != "function":
        raise ToolInputError(f"{where}: only function tools are supported (got type {tool.get('type')!r})")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise ToolInputError(f'{where} needs "function": {{"name": ..., "parameters": ...}}')
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip() or any(c in name for c in "\n\r\t\"\\"):
        raise ToolInputError(f"{where}.function needs a name (a non-empty string, no quotes or control characters)")
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise ToolInputError(f"{where}.function.description must be a string")
    params = fn.get("parameters")
    if params is None:
        params = dict(NO_PARAMETERS)
    elif not isinstance(params, dict) or params.get("type", "object") != "object":
        raise ToolInputError(f"{where}.function.parameters must be a JSON schema of an object ({name})")
    error = _schema_error(params)
    if error:
        raise ToolInputError(f"{where}.function.parameters is not a valid JSON schema ({name}): {error}")
    out = {k: v for k, v in fn.items() if v is not None}
    out["parameters"] = params
    return {"type": "function", "function": out}


def _schema_error(schema: dict[str, Any]) -> str:
    """What the grammar engine finds wrong with a parameters schema ("" when nothing)."""
    import llguidance

    text = llguidance.LLMatcher.grammar_from_lark("start: %json " + json.dumps(schema))
    error = llguidance.LLMatcher.validate_grammar(text, None)
    if not error or error.startswith("WARNING"):
        return ""
    return error.strip().splitlines()[0].split("failed to compile JSON schema: ")[-1]


def _duplicate(names: list[str]) -> str:
    return next(n for i, n in enumerate(names) if n in names[:i])


# --- the grammar ------------------------------------------------------------------------


def call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of one call of `tool`: its name, and arguments that match its parameters."""
    fn = tool["function"]
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": dict(JSON_LAYOUT)}


def marker_tokens(tokenizer) -> bool:
    """Does the tokenizer hold `<tool_call>` and `</tool_call>` as tokens of their own, kept
    in decoded text (Qwen2.5's: added tokens, not special)? The model then writes each as
    that one token, which the grammar must name as a token (`<tool_call>` in Lark), since
    llguidance does not let a string literal match an added token."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    kept = {t.content for t in decoder.values() if not getattr(t, "special", True)}
    return OPEN in kept and CLOSE in kept


def tool_grammar(tools: Sequence[dict[str, Any]], parallel: bool, as_tokens: bool = False) -> str:
    """Lark text: one call of any of `tools` (`parallel`: one or more, a line apart);
    `as_tokens`: the block's markers as the tokenizer's own tokens (see `marker_tokens`)."""
    open_, close = (OPEN, CLOSE) if as_tokens else (json.dumps(OPEN), json.dumps(CLOSE))
    rules = [f'call_{i}: {open_} "\\n" %json {json.dumps(call_schema(t))} "\\n" {close}'
             for i, t in enumerate(tools)]
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return "\n".join([start, "call: " + " | ".join(f"call_{i}" for i in range(len(tools))), *rules]) + "\n"


# --- the prompt -------------------------------------------------------------------------


PROBE_MESSAGES = [{"role": "user", "content": "What is the weather?"}]
PROBE_TOOLS = [{"type": "function", "function": {
    "name": "probe_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def renders_tools(render: Callable[[list[dict], list[dict] | None], str]) -> bool:
    """Does this chat template render tools? `render(messages, tools)` renders with it; a
    template without tool support ignores `tools`, so the text does not change."""
    return render(PROBE_MESSAGES, PROBE_TOOLS) != render(PROBE_MESSAGES, None)


def has_tool_messages(messages: Sequence[dict[str, Any]]) -> bool:
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def template_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that renders tools: replayed calls' arguments as objects
    (OpenAI sends them as JSON text; templates write them with `tojson`)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = dict(m, tool_calls=[_call_with_object_arguments(c) for c in m["tool_calls"]])
        out.append(m)
    return out


def _call_with_object_arguments(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call.get("function") or {})
    if isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except json.JSONDecodeError:
            pass
    return dict(call, function=fn)


def fallback_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """The system message that describes `tools` to a model whose template cannot."""
    return FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def fallback_messages(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None) -> list[dict]:
    """Messages for a template without tool support: the tools in a system message (merged
    into the first one), replayed calls as <tool_call> blocks, tool results as user
    messages holding <tool_response> blocks (consecutive results in one message)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            blocks = [format_call(c) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(([content] if content else []) + blocks)})
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")} | {"content": content})
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        system = fallback_prompt(tools)
        if out and out[0].get("role") == "system":
            out[0] = dict(out[0], content=f"{out[0]['content']}\n\n{system}" if out[0]["content"] else system)
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def format_call(call: dict[str, Any]) -> str:
    """A call (OpenAI's shape) as the model writes it."""
    fn = _call_with_object_arguments(call)["function"]
    body = {"name": fn.get("name"), "arguments": fn.get("arguments", {})}
    return f"{OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{CLOSE}"


# --- the answer -------------------------------------------------------------------------


def new_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A parsed call in OpenAI's shape (arguments as JSON text)."""
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def read_call(body: str, names: frozenset[str]) -> dict[str, Any] | None:
    """The call a block holds, or None when it is not a call of one of `names`."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return new_call(obj["name"], args) if isinstance(args, dict) else None


@dataclass
class ToolCallParser:
    """Splits an answer into content and tool calls as its text arrives.

    `feed(text)` and, at the end, `finish()` each return (content to send now, calls
    completed now). Content that may be the start of a block, and trailing whitespace, wait
    for the next text; whitespace that only separates calls is dropped. With no call
    parsed the content is the answer's whole text.
    """

    names: frozenset[str]
    calls: list[dict[str, Any]] = field(default_factory=list)
    _buffer: str = ""  # text not yet decided
    _inside: bool = False  # the buffer is the body of an open block
    _space: str = ""  # trailing whitespace of the content, held
    _after_call: bool = False  # no content since the last call

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self._buffer += text
        out, calls = [], []
        while True:
            if self._inside:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    break
                body, self._buffer, self._inside = self._buffer[:end], self._buffer[end + len(CLOSE):], False
                self._block(body, CLOSE, out, calls)
                continue
            start = self._buffer.find(OPEN)
            if start >= 0:
                out.append(self._content(self._buffer[:start]))
                self._buffer, self._inside = self._buffer[start + len(OPEN):], True
                continue
            keep = _open_prefix(self._buffer)
            out.append(self._content(self._buffer[:len(self._buffer) - keep]))
            self._buffer = self._buffer[len(self._buffer) - keep:]
            break
        return "".join(out), calls

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        out, calls = [], []
        if self._inside:  # an unclosed last block: a call when its JSON is complete
            self._block(self._buffer, "", out, calls)
        else:
            out.append(self._content(self._buffer))
        self._buffer, self._inside = "", False
        if not self.calls:
            out.append(self._space)
        self._space = ""
        return "".join(out), calls

    def _block(self, body: str, close: str, out: list[str], calls: list[dict[str, Any]]) -> None:
        call = read_call(body.strip(), self.names)
        if call is None:
            out.append(self._content(OPEN + body + close))
            return
        self.calls.append(call)
        calls.append(call)
        self._after_call, self._space = True, ""

    def _content(self, text: str) -> str:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return ""
            self._after_call = False
        text = self._space + text
        core = text.rstrip()
        self._space = text[len(core):]
        return core


def _open_prefix(text: str) -> int:
    """Characters at the end of `text` that could begin a block."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:k]):
            return k
    return 0


def parse_tool_calls(text: str, plan: ToolPlan) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) of a whole answer; content None when it is only calls."""
    parser = ToolCallParser(plan.names)
    head, first = parser.feed(text)
    tail, last = parser.finish()
    calls = first + last
    content = head + tail
    return (content or None) if calls else content, calls


def finish_reason(reason: str | None, calls: Sequence[dict[str, Any]]) -> str | None:
    """OpenAI's "tool_calls" when the answer holds calls (but "length" stays "length")."""
    return "tool_calls" if calls and reason != "length" else reason
