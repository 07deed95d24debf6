"""Tool calls (toolcalls.py and `LLM.chat(tools=...)`): the request's tools are checked,
rendered by a template that can (or described in the fallback system message to one that
cannot), `required` and a named function are enforced by a grammar whose calls match each
function's parameters, and the answer is split into content and calls: streamed in any
chunking exactly as parsed at once.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import EOS_ID, tiny_model
from draftwise.api import LLM
from draftwise.constraints import Matcher, compile_constraint
from draftwise.errors import BadInput
from draftwise.sampling import SamplingParams
from draftwise.toolcalls import (FALLBACK_PROMPT, ToolCallParser, ToolInputError, fallback_messages, format_call,
                                 parse_tool_calls, plan_tools, renders_tools, tool_grammar)

pytestmark = pytest.mark.usefixtures("one_thread")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city for the next days.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time now."}}  # no parameters
TOOLS = [WEATHER, CLOCK]
PARAMETERS = {"get_weather": WEATHER["function"]["parameters"], "now": {"type": "object", "properties": {}}}

# a chat template that renders tools the way Qwen2.5's does (a system block listing them,
# replayed calls as <tool_call> blocks); the byte tokenizer's own template ignores tools
TOOL_TEMPLATE = (
    "{% if tools %}<system>Tools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CHAT = [{"role": "user", "content": "What is the weather in Paris for three days?"}]


def call_text(name: str, arguments: dict) -> str:
    return format_call({"function": {"name": name, "arguments": arguments}})


# --- checking the request ---------------------------------------------------------------


@pytest.mark.parametrize("tools, choice, param, words", [
    ([{"type": "function", "function": {"description": "no name"}}], None, "tools", "needs a name"),
    ([{"type": "function", "function": {"name": ""}}], None, "tools", "needs a name"),
    ([{"type": "retrieval"}], None, "tools", "only function tools"),
    ([WEATHER, WEATHER], None, "tools", "share a name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], None, "tools",
     "schema of an object"),
    ([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "no-such-type"}}}}}], None, "tools", "not a valid JSON schema"),
    (TOOLS, {"type": "function", "function": {"name": "fly"}}, "tool_choice", "not one of the tools"),
    (TOOLS, "sometimes", "tool_choice", "must be one of"),
    (TOOLS, {"type": "function"}, "tool_choice", "named tool_choice"),
    (None, "required", "tool_choice", "needs tools"),
])
def test_bad_tools_are_refused_naming_the_parameter(tools, choice, param, words):
    with pytest.raises(ToolInputError) as e:
        plan_tools(tools, choice)
    assert e.value.param == param and words in str(e.value)
    assert isinstance(e.value, ValueError)  # the API's ValueError, as vLLM raises


def test_plans_of_each_tool_choice():
    assert plan_tools(None, None) is None and plan_tools([], "none") is None
    auto = plan_tools(TOOLS)
    assert auto.mode == "auto" and auto.constraint() is None and auto.prompt_tools == auto.tools and auto.parses
    assert auto.tools[1]["function"]["parameters"]["properties"] == {}  # OpenAI: parameters omitted = none
    none = plan_tools(TOOLS, "none")
    assert none.prompt_tools is None and not none.parses and none.constraint() is None
    assert plan_tools(TOOLS, "required").constraint().kind == "grammar"
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "now"}})
    assert named.mode == "named" and named.name == "now"


# --- the grammar ------------------------------------------------------------------------


def accepts(tokenizer, grammar: str, text: str) -> bool:
    """Does the compiled grammar take `text` to an accepting state?"""
    from draftwise.constraints import StructuredOutputsParams

    m = Matcher(compile_constraint(StructuredOutputsParams(grammar=grammar), tokenizer, 260, [EOS_ID]))
    ids = tokenizer.encode(text)
    return m.accepts(ids) and bool(m.allowed_after(ids)[-1, EOS_ID])


def test_the_call_grammar_takes_calls_of_the_tools_and_nothing_else(tokenizer):
    one = tool_grammar(plan_tools(TOOLS).tools, parallel=False)
    many = tool_grammar(plan_tools(TOOLS).tools, parallel=True)
    paris = call_text("get_weather", {"city": "Paris", "days": 3})
    clock = call_text("now", {})
    for grammar in (one, many):
        assert accepts(tokenizer, grammar, paris) and accepts(tokenizer, grammar, clock)
        assert not accepts(tokenizer, grammar, call_text("get_weather", {"city": "Lima", "days": 3}))  # not in enum
        assert not accepts(tokenizer, grammar, call_text("get_weather", {"city": "Paris", "days": 9}))  # > maximum
        assert not accepts(tokenizer, grammar, call_text("get_weather", {"city": "Paris"}))  # days required
        assert not accepts(tokenizer, grammar, call_text("fly", {}))
        assert not accepts(tokenizer, grammar, "Sure: " + paris)
    assert accepts(tokenizer, many, paris + "\n" + clock) and not accepts(tokenizer, one, paris + "\n" + clock)


# --- the prompt -------------------------------------------------------------------------


def test_a_template_without_tools_gets_the_fallback_system_message(tokenizer):
    def render(template):
        return lambda messages, tools: tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                                     chat_template=template)
    assert not renders_tools(render(None)) and renders_tools(render(TOOL_TEMPLATE))
    tools = plan_tools(TOOLS).tools
    history = [{"role": "system", "content": "Be brief."}, *CHAT,
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Paris", "days": 3}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
               {"role": "tool", "tool_call_id": "c2", "content": "windy"}]
    out = fallback_messages(history, tools)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n" + FALLBACK_PROMPT.split("{")[0])
    assert json.dumps(tools[0]) in out[0]["content"]
    assert out[2]["content"] == call_text("get_weather", {"city": "Paris", "days": 3})
    assert out[3]["content"] == "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nwindy\n</tool_response>"
    assert all(set(m) == {"role", "content"} for m in out)
    assert fallback_messages(CHAT, tools)[0]["role"] == "system"  # no system message: one is added


def test_llm_chat_prompt_renders_tools_with_either_template(tokenizer):
    llm = LLM.from_model(tiny_model(), tokenizer)
    tools = plan_tools(TOOLS).tools
    fallback = tokenizer.decode(llm.chat_prompt(CHAT, tools=tools))
    assert fallback.startswith("<system>You can call functions") and '"name": "get_weather"' in fallback
    rendered = tokenizer.decode(llm.chat_prompt(CHAT, tools=tools, chat_template=TOOL_TEMPLATE))
    assert rendered.startswith("<system>Tools:") and '"name": "get_weather"' in rendered
    assert "You can call functions" not in rendered
    replay = [*CHAT, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "now", "arguments": "{}"}}]}]
    text = tokenizer.decode(llm.chat_prompt(replay, tools=tools, chat_template=TOOL_TEMPLATE,
                                            add_generation_prompt=False))
    assert '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>' in text  # arguments as an object


# --- the answer -------------------------------------------------------------------------

NAMES = frozenset(["get_weather", "now"])
ANSWERS = [
    ("Just text, no call.", "Just text, no call.", []),
    (call_text("now", {}), None, [("now", {})]),
    ("Let me check.\n" + call_text("get_weather", {"city": "Rome", "days": 2}) + "\n" + call_text("now", {}),
     "Let me check.", [("get_weather", {"city": "Rome", "days": 2}), ("now", {})]),
    (call_text("fly", {}), call_text("fly", {}), []),  # an unknown function stays content
    ("<tool_call>\n{not json}\n</tool_call> ok", "<tool_call>\n{not json}\n</tool_call> ok", []),
    ('<tool_call>\n{"name": "now", "arguments": "{}"}', None, [("now", {})]),  # unclosed last block, arguments text
    ("a < b and <tool", "a < b and <tool", []),
]


def calls_of(calls) -> list:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("text, content, calls", ANSWERS)
def test_answers_split_into_content_and_calls(text, content, calls):
    got_content, got_calls = parse_tool_calls(text, plan_tools(TOOLS))
    assert got_content == content and calls_of(got_calls) == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got_calls)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(range(len(ANSWERS))), st.lists(st.integers(0, 200), max_size=8))
def test_streamed_in_any_chunks_equals_parsed_at_once(which, cuts):
    text, content, calls = ANSWERS[which]
    bounds = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)])]
    parser = ToolCallParser(NAMES)
    streamed, got = [], []
    for piece in pieces:
        out, new = parser.feed(piece)
        streamed.append(out)
        got += new
    out, new = parser.finish()
    streamed.append(out)
    got += new
    assert "".join(streamed) == (content or "") and calls_of(got) == calls


# --- LLM.chat ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llms(tokenizer):
    target = tiny_model(std=0.1, max_position_embeddings=2048)  # the tools prompt is ~950 byte tokens
    plain = LLM.from_model(target, tokenizer, max_batch_size=2)
    ngram = LLM.from_model(target, tokenizer, max_batch_size=2,
                           speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    return plain, ngram


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_chat_with_required_or_named_tools_answers_with_valid_calls(llms, choice):
    plain, ngram = llms
    params = SamplingParams(temperature=0.0, max_tokens=120)
    outs = [llm.chat([CHAT, CHAT[:1]], params, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False)
            for llm in llms]
    assert [o.outputs[0].token_ids for o in outs[0]] == [o.outputs[0].token_ids for o in outs[1]]  # exact
    for out in outs[1]:
        sample = out.outputs[0]
        assert sample.finish_reason == "stop" and len(sample.tool_calls) == 1, sample.text
        call = sample.tool_calls[0]["function"]
        if isinstance(choice, dict):
            assert call["name"] == "get_weather"
        jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])
        assert sample.stats["forced_tokens"] > 0  # `<tool_call>`, the keys, the braces


def test_chat_with_auto_tools_is_plain_decoding_of_the_tools_prompt(llms, tokenizer):
    plain, ngram = llms
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    got = ngram.chat(CHAT, params, tools=TOOLS)[0].outputs[0]
    ids = plain.chat_prompt(CHAT, tools=plan_tools(TOOLS).tools)
    assert got.token_ids == plain.generate([ids], params)[0].token_ids
    assert got.tool_calls == parse_tool_calls(got.text, plan_tools(TOOLS))[1] == []  # random text holds no call
    none = ngram.chat(CHAT, params, tools=TOOLS, tool_choice="none")[0].outputs[0]
    assert none.token_ids == plain.chat(CHAT, params)[0].outputs[0].token_ids and none.tool_calls is None


def test_chat_refuses_bad_tools_and_tools_with_a_constraint(llms):
    from draftwise.constraints import StructuredOutputsParams

    plain, _ = llms
    with pytest.raises(ValueError, match="needs a name"):
        plain.chat(CHAT, tools=[{"type": "function", "function": {}}])
    with pytest.raises(BadInput, match="cannot be combined"):
        plain.chat(CHAT, SamplingParams(structured_outputs=StructuredOutputsParams(regex="a+")), tools=TOOLS,
                   tool_choice="required")


# --- a tokenizer that holds the markers as tokens (Qwen2.5's) ------------------------------


@pytest.fixture(scope="module")
def marker_tokenizer():
    """The byte tokenizer plus `<tool_call>` / `</tool_call>` as added, non-special tokens
    (ids 257, 258), as Qwen2.5's tokenizer holds them."""
    from conftest import byte_tokenizer

    tok = byte_tokenizer()
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    return tok


def test_markers_held_as_tokens_are_written_as_those_tokens(marker_tokenizer, tokenizer):
    from draftwise.toolcalls import marker_tokens

    assert marker_tokens(marker_tokenizer) and not marker_tokens(tokenizer)
    target = tiny_model(std=0.1, max_position_embeddings=2048)
    plain = LLM.from_model(target, marker_tokenizer, max_batch_size=1)
    ngram = LLM.from_model(target, marker_tokenizer, max_batch_size=1,
                           speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    params = SamplingParams(temperature=0.0, max_tokens=120)
    outs = [llm.chat(CHAT, params, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)[0].outputs[0]
            for llm in (plain, ngram)]
    assert outs[0].token_ids == outs[1].token_ids
    got = outs[1]
    assert got.token_ids[0] == 257 and 258 in got.token_ids  # the markers' own tokens, not their letters
    assert got.finish_reason == "stop" and len(got.tool_calls) == 1, got.text
    jsonschema.validate(json.loads(got.tool_calls[0]["function"]["arguments"]),
                        PARAMETERS[got.tool_calls[0]["function"]["name"]])


def test_a_grammar_dead_end_finishes_the_request_instead_of_failing(marker_tokenizer):
    """A literal that only an added token spells is a dead end for llguidance (its mask
    offers the added token, its matcher refuses it): the mask drops the refused token and
    the request ends there, batched beside a request that goes on."""
    from draftwise.constraints import StructuredOutputsParams

    llm = LLM.from_model(tiny_model(std=0.1), marker_tokenizer, max_batch_size=2,
                         speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    stuck = SamplingParams(temperature=0.0, max_tokens=16, structured_outputs=StructuredOutputsParams(
        grammar='start: "<tool_call>" "x"\n'))
    free = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    a, b = llm.generate(["abc", "abc"], [stuck, free])
    assert a.outputs[0].finish_reason == "stop" and a.outputs[0].token_ids == []
    assert len(b.outputs[0].token_ids) == 16
