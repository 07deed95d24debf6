"""Structured output and tool calls through the server, the CLI and vLLM's own example.

Each spelling a client may use (OpenAI's `response_format`, vLLM's `structured_outputs`
and the older `guided_*` fields) gives the very tokens `LLM.generate` gives with the same
constraint; tool calls come back as `message.tool_calls` (and streamed as
`delta.tool_calls`) with `finish_reason: "tool_calls"`; forced tokens reach the response's
stats and /metrics; each bad input is a 400 naming its parameter (the CLI: exit 2, one
line). A tiny random model serves (no downloads), speculating with prompt lookup.
"""

from __future__ import annotations

import io
import json
import re
import sys
import threading

import jsonschema
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from conftest import tiny_model  # noqa: E402
from draftwise.api import LLM  # noqa: E402
from draftwise.constraints import StructuredOutputsParams  # noqa: E402
from draftwise.sampling import SamplingParams  # noqa: E402
from draftwise.server import ServerThread, create_app  # noqa: E402
from test_tool_calls import CHAT, PARAMETERS, TOOLS  # noqa: E402

MODEL = "tiny"
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 5}, "n": {"type": "integer", "minimum": 0, "maximum": 50},
                   "ok": {"type": "boolean"}},
    "required": ["name", "n", "ok"], "additionalProperties": False,
}
REGEX = r"[a-c]{2,6}-[0-9]{1,3}"
CHOICE = ["abcabc", "abd", "xyz"]
GRAMMAR = 'start: "id=" /[0-9]{2}/ ";"\n'
PROMPT = "the cat sat on the mat. the cat sat on the"

# (request fields, the same constraint as the API takes it, a check of the output text)
SPELLINGS = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA, "strict": True}}},
     StructuredOutputsParams(json=SCHEMA), lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
    ({"structured_outputs": {"json": SCHEMA}}, StructuredOutputsParams(json=SCHEMA),
     lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
    ({"guided_json": json.dumps(SCHEMA)}, StructuredOutputsParams(json=SCHEMA),
     lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
    ({"structured_outputs": {"regex": REGEX}}, StructuredOutputsParams(regex=REGEX),
     lambda t: re.fullmatch(REGEX, t) or pytest.fail(t)),
    ({"guided_regex": REGEX}, StructuredOutputsParams(regex=REGEX), lambda t: re.fullmatch(REGEX, t) or pytest.fail(t)),
    ({"structured_outputs": {"choice": CHOICE}}, StructuredOutputsParams(choice=CHOICE),
     lambda t: t in CHOICE or pytest.fail(t)),
    ({"guided_choice": CHOICE}, StructuredOutputsParams(choice=CHOICE), lambda t: t in CHOICE or pytest.fail(t)),
    ({"structured_outputs": {"grammar": GRAMMAR}}, StructuredOutputsParams(grammar=GRAMMAR),
     lambda t: re.fullmatch(r"id=[0-9]{2};", t) or pytest.fail(t)),
    ({"guided_grammar": GRAMMAR}, StructuredOutputsParams(grammar=GRAMMAR),
     lambda t: re.fullmatch(r"id=[0-9]{2};", t) or pytest.fail(t)),
]


@pytest.fixture(scope="module")
def target():
    return tiny_model(std=0.1, max_position_embeddings=2048)  # the tools prompt is ~950 byte tokens


@pytest.fixture(scope="module")
def plain(target, tokenizer):
    return LLM.from_model(target, tokenizer, max_batch_size=1)


@pytest.fixture(scope="module")
def server(target, tokenizer):
    llm = LLM.from_model(target, tokenizer, max_batch_size=4,
                         speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    with ServerThread(create_app(llm, served_model_name=MODEL)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as c:
        yield c


def post(http, path: str, body: dict) -> dict:
    r = http.post(path, json={"model": MODEL, "temperature": 0, "max_tokens": 64, "return_token_ids": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("fields, spec, check", SPELLINGS, ids=lambda v: next(iter(v)) if isinstance(v, dict) else "")
def test_each_spelling_gives_the_apis_constrained_tokens(http, plain, fields, spec, check):
    got = post(http, "/v1/completions", {"prompt": PROMPT, **fields})["choices"][0]
    want = plain.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=64, structured_outputs=spec))[0]
    assert got["token_ids"] == want.outputs[0].token_ids and got["finish_reason"] == "stop"
    check(got["text"])


def test_chat_json_object_and_schema_with_the_openai_client(client, plain):
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=64,
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": "r", "schema": SCHEMA, "strict": True}})
    want = plain.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=64,
                                           structured_outputs=StructuredOutputsParams(json=SCHEMA)))[0]
    assert reply.choices[0].message.content == want.outputs[0].text
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    obj = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=48, seed=3,
                                         response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:  # a random model's string can outrun max_tokens; what came is JSON's beginning
        assert obj.choices[0].finish_reason == "length" and obj.choices[0].message.content.startswith("{")


def test_forced_tokens_reach_the_stats_and_metrics(http):
    before = metric(http, "draftwise:forced_tokens_total")
    reply = post(http, "/v1/completions", {"prompt": PROMPT, "structured_outputs": {"json": SCHEMA}})
    forced = reply["draftwise"]["forced_tokens"]
    assert forced >= len('{"name": "') and forced < reply["usage"]["completion_tokens"]
    assert metric(http, "draftwise:forced_tokens_total") - before == forced
    assert metric(http, "draftwise:forced_draft_tokens_total") >= forced


def metric(http, name: str) -> float:
    lines = [line for line in http.get("/metrics").text.splitlines() if line.startswith(name + "{")]
    assert lines, name
    return float(lines[0].rsplit(" ", 1)[1])


def test_constrained_and_plain_requests_side_by_side(http, plain):
    """Concurrent requests, batched together: the unconstrained ones are plain decoding,
    the constrained ones their constraint's tokens."""
    bodies = [{"prompt": PROMPT, "ignore_eos": True, "max_tokens": 24}, {"prompt": PROMPT, "guided_regex": REGEX},
              {"prompt": "abcabcabc", "ignore_eos": True, "max_tokens": 24},
              {"prompt": "abcabcabc", "structured_outputs": {"json": SCHEMA}}]
    results: list = [None] * len(bodies)

    def send(i):
        results[i] = post(http, "/v1/completions", bodies[i])["choices"][0]["token_ids"]
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    specs = [None, StructuredOutputsParams(regex=REGEX), None, StructuredOutputsParams(json=SCHEMA)]
    for got, body, spec in zip(results, bodies, specs):
        params = SamplingParams(temperature=0.0, max_tokens=body.get("max_tokens", 64),
                                ignore_eos=body.get("ignore_eos", False), structured_outputs=spec)
        assert got == plain.generate([body["prompt"]], params)[0].outputs[0].token_ids


def test_a_constraint_that_cannot_finish_ends_with_length(http):
    long = {"type": "object", "properties": {"text": {"type": "string", "minLength": 40}}, "required": ["text"]}
    choice = post(http, "/v1/completions", {"prompt": PROMPT, "max_tokens": 16,
                                            "structured_outputs": {"json": long}})["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["token_ids"]) == 16  # byte tokens
    assert choice["text"].startswith('{"text": "')


BAD_SCHEMA = {"type": "object", "properties": {"a": {"type": "no-such-type"}}}
BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": BAD_SCHEMA}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "r"}}}, "response_format"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "start: ("}}, "structured_outputs"),
    ({"structured_outputs": {"colour": "red"}}, "structured_outputs"),
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a+", "structured_outputs": {"regex": "b+"}}, "guided_regex"),
    ({"guided_whitespace_pattern": " *"}, "guided_whitespace_pattern"),
    ({"tools": [{"type": "function", "function": {"description": "nameless"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a+"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
]


@pytest.mark.parametrize("fields, param", BAD, ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else v)
def test_bad_constraints_and_tools_are_400s_naming_the_parameter(http, fields, param):
    path, base = "/v1/chat/completions", {"messages": CHAT}
    if not any(k in fields for k in ("tools", "tool_choice", "functions")):
        path, base = "/v1/completions", {"prompt": PROMPT}
    r = http.post(path, json={"model": MODEL, "max_tokens": 8, **base, **fields})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"], err
    assert "Traceback" not in err["message"] and "\n" not in err["message"]


def test_a_grammar_that_compiles_too_long_is_a_400(http, monkeypatch):
    import time

    import draftwise.constraints.compile as compile_module

    real = compile_module._build
    monkeypatch.setattr(compile_module, "COMPILE_SECONDS", 0.05)
    monkeypatch.setattr(compile_module, "_build", lambda *a: (time.sleep(0.5), real(*a))[1])
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "guided_regex": "slow-server[0-9]+"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex"
    assert "did not compile within" in r.json()["error"]["message"]


# --- tool calls -------------------------------------------------------------------------


def check_call(call, name: str | None = None) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    if name is not None:
        assert call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


@pytest.mark.parametrize("choice, parallel", [("required", False), ("required", True),
                                              ({"type": "function", "function": {"name": "get_weather"}}, True)])
def test_tool_calls_unstreamed_and_streamed(client, choice, parallel):
    kw = dict(model=MODEL, messages=CHAT, tools=TOOLS, tool_choice=choice, parallel_tool_calls=parallel,
              temperature=0, max_tokens=160)
    reply = client.chat.completions.create(**kw)
    first = reply.choices[0]
    assert first.message.tool_calls
    for call in first.message.tool_calls:
        check_call(call, "get_weather" if isinstance(choice, dict) else None)
    if parallel and choice == "required":  # calls a line apart until EOS: a random model may go on to max_tokens
        assert first.finish_reason in ("tool_calls", "length")
    else:
        assert first.finish_reason == "tool_calls" and len(first.message.tool_calls) == 1
    if first.finish_reason == "tool_calls":
        assert first.message.content is None
    else:  # the call cut off by max_tokens stays content
        assert first.message.content.startswith("<tool_call>\n")
    streamed: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                streamed.setdefault(d.index, {"name": "", "arguments": ""})
                streamed[d.index]["name"] += d.function.name or ""
                streamed[d.index]["arguments"] += d.function.arguments or ""
            finish = c.finish_reason or finish
    assert finish == first.finish_reason and content == (first.message.content or "")
    assert [streamed[i] for i in sorted(streamed)] == [
        {"name": c.function.name, "arguments": c.function.arguments} for c in first.message.tool_calls]


def test_tools_auto_answers_text_that_holds_no_call(client):
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, temperature=0, max_tokens=16)
    choice = reply.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
    none = client.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=16)
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=16)
    assert none.choices[0].message.content == plain.choices[0].message.content


def test_a_conversation_replaying_calls_and_results_is_rendered(client, server):
    calls = [{"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}}]
    messages = [*CHAT, {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_1", "content": "rain"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=8)
    assert reply.choices[0].finish_reason in ("stop", "length")


# --- the CLI ----------------------------------------------------------------------------


def cli(args, capsys):
    from draftwise.cli import main

    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_constraint_flags(hf_folder, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    base = ["generate", "abc", "--model", str(hf_folder), "--dtype", "fp32", "--max-tokens", "64", "--temperature",
            "0", "--json"]
    for flags, check in [(["--json-schema", str(schema)], SPELLINGS[0][2]), (["--regex", REGEX], SPELLINGS[3][2]),
                         (["--choice", ",".join(CHOICE)], SPELLINGS[5][2]),
                         (["--speculator", "ngram", "--regex", REGEX], SPELLINGS[3][2])]:
        code, out, err = cli(base + flags, capsys)
        assert code == 0, err
        got = json.loads(out)
        assert got["finish_reason"] == "stop"
        check(got["text"])
    grammar = tmp_path / "g.lark"
    grammar.write_text(GRAMMAR)
    code, out, _ = cli(base + ["--grammar", str(grammar)], capsys)
    assert code == 0 and re.fullmatch(r"id=[0-9]{2};", json.loads(out)["text"])


@pytest.mark.parametrize("flags, words", [
    (["--regex", "a(b"], "invalid regex"),
    (["--json-schema", "{missing}"], "cannot read"),
    (["--json-schema", "{schema_text}"], "not JSON"),
    (["--grammar", "{bad_grammar}"], "invalid grammar"),
    (["--choice", ","], "at least one"),
])
def test_cli_bad_constraints_exit_2_with_one_line(hf_folder, tmp_path, capsys, flags, words):
    (tmp_path / "s.json").write_text("{oops")
    (tmp_path / "g.lark").write_text("start: (")
    flags = [f.format(missing=tmp_path / "nope.json", schema_text=tmp_path / "s.json", bad_grammar=tmp_path / "g.lark")
             for f in flags]
    code, out, err = cli(["generate", "abc", "--model", str(hf_folder), "--dtype", "fp32"] + flags, capsys)
    assert code == 2 and err.startswith("error: ") and words in err and err.count("\n") == 1, err


# --- vLLM's example ---------------------------------------------------------------------


def test_vllms_structured_outputs_example_runs_with_only_the_import_changed(tmp_path, monkeypatch, capsys):
    """tests/vllm_structured_outputs_example.py is vLLM's example with `vllm` changed to
    `draftwise`. Its model id resolves from a Hugging Face cache laid out here (a tiny
    random Llama, a byte-level BPE tokenizer trained on the example's prompts so that they
    fit its max_model_len of 100), with the Hub unreachable; each printed answer follows
    its constraint (or, where a random model's free text outran max_tokens, begins it)."""
    import runpy

    import huggingface_hub.constants as hf_constants
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from test_loading import lay_out_hub_cache

    path = __file__.replace("test_structured_server.py", "vllm_structured_outputs_example.py")
    source = open(path, encoding="utf-8").read()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([source] * 3, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    src = tmp_path / "src"
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tok.eos_token_id)
    tf.LlamaForCausalLM(cfg).save_pretrained(src)
    tok.save_pretrained(src)
    cache = tmp_path / "hf-cache"
    lay_out_hub_cache(cache, "Qwen/Qwen2.5-3B-Instruct", src)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    runpy.run_path(path, run_name="__main__")
    printed = sys.stdout.getvalue()
    answers = dict(re.findall(r"^Structured outputs by (\w+): (.*)$", printed, flags=re.M))
    assert set(answers) == {"Choice", "Regex", "JSON", "Grammar"}, printed
    assert answers["Choice"] in ("Positive", "Negative")
    assert re.fullmatch(r"\w+(@\w*(\.(c(om?)?)?)?)?", answers["Regex"]), answers["Regex"]
    assert answers["JSON"].startswith('{"brand": "')
    sql = r"SELECT (col_1|col_2)  from (table_1|table_2)  where (col_1|col_2) = [12] "
    assert re.fullmatch(sql, answers["Grammar"]), answers["Grammar"]
