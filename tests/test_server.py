"""The OpenAI-compatible server, end to end: a real uvicorn server on 127.0.0.1, the real openai client.

The app wraps a tiny random-weight model (no downloads). Greedy answers must be the very
tokens offline `LLM.generate` gives; bad input must come back as a 4xx OpenAI error
envelope; disconnects, a full queue, the API key and a graceful drain are exercised too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from conftest import tiny_model  # noqa: E402
from draftwise.api import LLM  # noqa: E402
from draftwise.cli import main as cli_main  # noqa: E402
from draftwise.errors import BadInput  # noqa: E402
from draftwise.sampling import SamplingParams  # noqa: E402
from draftwise.server import ServerThread, create_app  # noqa: E402
from draftwise.server.loadtest import check_loopback, format_report, run_loadtest  # noqa: E402

KEY = "test-key"
MODEL = "tiny"
STD = 0.1  # weights peaked enough for repetitive greedy text, so prompt lookup gets accepted
PROMPTS = ["abcabcabcabcabc", "the cat sat on the mat. the cat sat on the", "x = 1\nx = 1\n"]


def make_llm(tokenizer, spec: dict | None = None, batch: int = 4) -> LLM:
    return LLM.from_model(tiny_model(std=STD), tokenizer, speculative_config=spec, max_batch_size=batch)


@pytest.fixture(scope="module")
def offline(tokenizer):
    """Greedy reference outputs from offline generation (plain decoding), cached per prompt and length."""
    llm = make_llm(tokenizer, batch=1)
    cache: dict = {}

    def ref(prompt, max_tokens: int, chat: bool = False):
        key = (json.dumps(prompt), max_tokens, chat)
        if key not in cache:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            run = llm.chat if chat else llm.generate
            cache[key] = run(prompt, params)[0]
        return cache[key]

    return ref


@pytest.fixture(scope="module")
def server(tokenizer):
    llm = make_llm(tokenizer, {"method": "ngram", "num_speculative_tokens": 3})
    app = create_app(llm, served_model_name=MODEL, api_key=KEY, max_queue=2, max_body_bytes=16 * 1024)
    with ServerThread(app) as srv:
        srv.app, srv.llm = app, llm
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      trust_env=False) as c:
        yield c


def greedy(max_tokens: int, **extra) -> dict:
    return {"max_tokens": max_tokens, "temperature": 0,
            "extra_body": {"ignore_eos": True, "return_token_ids": True, **extra}}


@contextlib.contextmanager
def slow_engine(llm, seconds: float = 0.01):
    """Make every engine step take at least `seconds`, so a request is surely still running."""
    step = llm.engine.step

    def slow_step():
        time.sleep(seconds)
        return step()

    llm.engine.step = slow_step
    try:
        yield
    finally:
        del llm.engine.step


def aborted(http) -> float:
    line = next(x for x in http.get("/metrics").text.splitlines()
                if x.startswith("vllm:request_success_total") and 'finished_reason="abort"' in x)
    return float(line.rsplit(" ", 1)[1])


def wait_idle(server, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while server.app.state.draftwise.engine.in_flight:
        assert time.monotonic() < deadline, "requests still in flight"
        time.sleep(0.02)


# --- generation ---------------------------------------------------------------------------------


def test_completion_greedy_matches_offline(client, offline):
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[0], **greedy(24))
    ref = offline(PROMPTS[0], 24)
    choice = resp.choices[0]
    assert choice.model_extra["token_ids"] == ref.token_ids
    assert choice.text == ref.text and choice.finish_reason == "length"
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids) and resp.usage.completion_tokens == 24
    spec = resp.model_extra["draftwise"]
    assert spec["method"] == "ngram" and spec["output_tokens"] == 24
    assert spec["accepted_tokens"] > 0, "the repetitive prompt must exercise acceptance"


def test_completion_stream_matches_offline(client, offline):
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[1], stream=True,
                                       stream_options={"include_usage": True}, **greedy(20))
    chunks = list(stream)
    ref = offline(PROMPTS[1], 20)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra.get("token_ids", [])]
    assert ids == ref.token_ids
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_a_long_answer_streams_as_its_tokens_are_committed(client, offline):
    """A 64-token answer arrives in many chunks, one per engine step (never held to the end),
    each carrying the tokens that step committed, and together the offline answer."""
    chunks = [c for c in client.completions.create(model=MODEL, prompt=PROMPTS[2], stream=True, **greedy(64))
              if c.choices]
    per_chunk = [len(c.choices[0].model_extra.get("token_ids", [])) for c in chunks]
    assert sum(per_chunk) == 64 and len(chunks) > 1
    assert [t for c in chunks for t in c.choices[0].model_extra["token_ids"]] == offline(PROMPTS[2], 64).token_ids
    assert max(per_chunk) <= 4, "a chunk holds at most one step: the ngram draft (3) and the bonus token"


def test_chat_stream_and_not_match_offline(client, offline):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "abcabcabc"}]
    ref = offline(messages, 16, chat=True)
    resp = client.chat.completions.create(model=MODEL, messages=messages, **greedy(16))
    assert resp.object == "chat.completion" and resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == ref.text
    assert resp.choices[0].model_extra["token_ids"] == ref.token_ids
    assert resp.usage.total_tokens == len(ref.prompt_token_ids) + 16
    stream = client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                            stream_options={"include_usage": True}, **greedy(16))
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16
    # max_completion_tokens is the chat name of max_tokens
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5, temperature=0)
    assert resp.usage.completion_tokens <= 5


def test_logprobs_completions_and_chat(client, server, tokenizer):
    """Logprobs are the target's own (raw) log-probabilities of each emitted token, as offline
    generation computes them with the same speculation, in both OpenAI shapes, streamed or not."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    ref = server.llm.generate(PROMPTS[0], params)[0]
    assert len(ref.logprobs) == 12 and [lp.token for lp in ref.logprobs] == ref.token_ids
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[0], logprobs=3, **greedy(12))
    lp = resp.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([x.logprob for x in ref.logprobs], abs=1e-5)
    from draftwise.server.logprobs import LogprobFormatter

    names = LogprobFormatter(tokenizer)  # text, or bytes:\xNN for part of a multi-byte character
    assert lp.tokens == [names.text(t) for t in ref.token_ids]
    assert "".join(tokenizer.decode([t]) for t in ref.token_ids) == resp.choices[0].text and lp.text_offset[0] == 0
    for top, x in zip(lp.top_logprobs, ref.logprobs):  # the 3 best, plus the chosen one
        assert max(top.values()) == pytest.approx(x.top[0][1], abs=1e-5) and 3 <= len(top) <= 4
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], logprobs=3, stream=True,
                                            **greedy(12)))
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs

    messages = [{"role": "user", "content": "abcabcabc"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, logprobs=True, top_logprobs=2,
                                          **greedy(10))
    content = chat.choices[0].logprobs.content
    assert len(content) == 10 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob <= 0 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)
    assert all(c.bytes == list(names.raw(t)) for c, t in zip(content, chat.choices[0].model_extra["token_ids"]))
    plain = client.chat.completions.create(model=MODEL, messages=messages, **greedy(10))
    assert plain.choices[0].logprobs is None


def test_logit_bias_min_tokens_and_stop_string_options(client, http, offline):
    forced = client.completions.create(model=MODEL, prompt=PROMPTS[0], logit_bias={str(ord("z")): 100},
                                       **greedy(6))
    assert forced.choices[0].text == "zzzzzz"
    ref = offline(PROMPTS[0], 12)
    first = ref.token_ids[0]
    banned = client.completions.create(model=MODEL, prompt=PROMPTS[0], **greedy(
        12, min_tokens=3, stop_token_ids=[first], ignore_eos=False))
    assert first not in banned.choices[0].model_extra["token_ids"][:3]
    stop = ref.text[4:6]
    kept = client.completions.create(model=MODEL, prompt=PROMPTS[0], stop=[stop],
                                     **greedy(12, include_stop_str_in_output=True))
    assert kept.choices[0].text == ref.text[: ref.text.index(stop) + 2] and kept.choices[0].finish_reason == "stop"
    for bad in ({"9x": 1}, {"3": 101}, {"-1": 1}, {"100000": 1}):
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "logit_bias": bad})
        error = r.json()["error"]
        assert r.status_code == 400 and "logit_bias" in error["message"] and error["param"] == "logit_bias", bad
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "stop_token_ids": [100000]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids"


def test_concurrent_requests_with_different_settings(client, offline):
    results: dict = {}

    def run(name, fn):
        try:
            results[name] = fn()
        except Exception as e:  # reported by the assertion below
            results[name] = e

    jobs = {f"greedy{i}": (lambda p=p: client.completions.create(model=MODEL, prompt=p, **greedy(12)))
            for i, p in enumerate(PROMPTS)}
    jobs["sampled"] = lambda: client.completions.create(
        model=MODEL, prompt="hello", max_tokens=10, temperature=0.9, top_p=0.9, seed=7, n=2, presence_penalty=0.5,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True})
    jobs["stop"] = lambda: client.completions.create(model=MODEL, prompt=PROMPTS[0], stop=["c"], **greedy(12))
    threads = [threading.Thread(target=run, args=(name, fn)) for name, fn in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for name, res in results.items():
        assert not isinstance(res, Exception), f"{name}: {res!r}"
    for i, p in enumerate(PROMPTS):  # each answer is its own prompt's, untouched by its neighbours
        assert results[f"greedy{i}"].choices[0].model_extra["token_ids"] == offline(p, 12).token_ids
    sampled = results["sampled"]
    assert [c.index for c in sampled.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in sampled.choices) and sampled.usage.completion_tokens == 20
    stop = results["stop"].choices[0]
    full = offline(PROMPTS[0], 12).text
    if "c" in full:
        assert stop.finish_reason == "stop" and stop.text == full[: full.index("c")]


def test_seeded_sampling_under_concurrency_equals_solo_plain(tokenizer):
    """8 concurrent seeded, sampled requests through a speculating (ngram) server each get
    the tokens that plain decoding of that request alone samples (coupled sampling)."""
    solo = make_llm(tokenizer, batch=1)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    settings = [dict(temperature=0.8 + 0.05 * i, seed=100 + i, top_p=0.95) for i in range(8)]
    want = [solo.generate(p, SamplingParams(max_tokens=16, ignore_eos=True, **kw))[0].token_ids
            for p, kw in zip(prompts, settings)]
    llm = make_llm(tokenizer, {"method": "ngram", "num_speculative_tokens": 3})
    got: dict = {}
    with ServerThread(create_app(llm, served_model_name=MODEL, max_queue=8)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)

        def run(i):
            try:
                got[i] = client.completions.create(
                    model=MODEL, prompt=prompts[i], max_tokens=16, **settings[i],
                    extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0].model_extra["token_ids"]
            except Exception as e:  # reported by the assertion below
                got[i] = e

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert [got.get(i) for i in range(8)] == want


# --- bad input ----------------------------------------------------------------------------------

BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", {"prompt": 3}, 400, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, None),
    ("/v1/completions", {"prompt": "x", "temperature": 5}, 400, None),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, None),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, None),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model_not_found"),
    ("/v1/completions", {"prompt": ""}, 400, None),
    ("/v1/completions", {"prompt": []}, 400, None),
    ("/v1/completions", {"prompt": [1, 2, 9999]}, 400, None),
    ("/v1/completions", {"prompt": [-1]}, 400, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 600}, 400, "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x" * 600}, 400, "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, None),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "unsupported_parameter"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, None),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "unsupported_parameter"),
    ("/v1/completions", {"prompt": "x", "bogus": 1}, 400, None),
    ("/v1/completions", {"prompt": "x", "n": 7}, 400, None),  # 4 rows + 2 queue places < 7
    ("/v1/completions", {"prompt": "x" * 20000}, 413, "request_too_large"),
    ("/v1/chat/completions", {"messages": []}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 600}]}, 400, "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400,
     "unsupported_parameter"),
    # invalid Unicode (lone surrogates) anywhere a client sends text: a 400, never a 500
    ("/v1/completions", b'{"prompt": "abc \\ud800 def"}', 400, None),
    ("/v1/completions", b'{"prompt": "x", "model": "\\ud800"}', 400, None),
    ("/v1/completions", b'{"prompt": "x", "stop": ["\\udfff"]}', 400, None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, None),
    ("/tokenize", b'{"prompt": "abc \\ud800 def"}', 400, None),
    # strict types: a string is not a boolean
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, None),
    ("/v1/completions", {"prompt": "x", "ignore_eos": 1}, 400, None),
    ("/v1/completions", {"prompt": "x", "sampling": "magic"}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": "true"}, 400, None),
    ("/tokenize", {}, 400, None),
    ("/detokenize", {"tokens": [5000]}, 400, None),
    ("/v1/nothing", {}, 404, None),
]


def test_bad_input_gets_4xx_error_envelope(http, client):
    for path, body, status, code in BAD:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = http.post(path, headers={"Content-Type": "application/json"}, **kw)
        assert r.status_code == status, (path, body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
        if code is not None:
            assert err["code"] == code, r.text
    r = http.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=10_000)


def test_models_health_tokenize(http, tokenizer):
    assert http.get("/health").status_code == 200
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["draftwise"] == {"quantization": "none", "dtype": "fp32", "device": "cpu",
                                              "speculator": "ngram"}
    tok = http.post("/tokenize", json={"prompt": "hello"}).json()
    assert tok["tokens"] == tokenizer.encode("hello") and tok["count"] == 5 and tok["max_model_len"] == 512
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "hello"
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] == len(tokenizer.encode("<user>hi\n<assistant>"))


def test_api_key_required_and_checked(server):
    with httpx.Client(base_url=server.url, trust_env=False, timeout=30) as anon:
        assert anon.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
            r = anon.post("/v1/completions", json={"prompt": "x"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert anon.get("/metrics").status_code == 401
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# --- lifecycle ----------------------------------------------------------------------------------


def test_disconnect_mid_stream_frees_the_row_and_queue_full(server, http, client, offline):
    body = {"prompt": PROMPTS[2], "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True, "n": 6}
    with slow_engine(server.llm), http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        # all 4 rows and both queue places are taken now
        full = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert full.status_code == 429 and full.json()["error"]["type"] == "rate_limit_error"
    wait_idle(server)  # closing the stream aborted all six requests
    assert aborted(http) >= 6
    assert server.llm.engine.free_rows == [0, 1, 2, 3] and not server.llm.engine.running
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[2], **greedy(10))
    assert resp.choices[0].model_extra["token_ids"] == offline(PROMPTS[2], 10).token_ids


def test_disconnect_while_waiting_non_streaming(server, http):
    before = aborted(http)
    with slow_engine(server.llm), pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json={"prompt": "x", "max_tokens": 400, "ignore_eos": True}, timeout=0.3)
    wait_idle(server)
    assert aborted(http) == before + 1


def test_metrics_have_vllm_names_after_speculative_request(client, http):
    client.completions.create(model=MODEL, prompt=PROMPTS[0], **greedy(16))
    text = http.get("/metrics").text
    for name in ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
                 "vllm:spec_decode_num_accepted_tokens_total", "vllm:spec_decode_num_accepted_tokens_per_pos_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "draftwise:spec_decode_num_accepted_tokens_total"):
        assert name in text, name
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("vllm:") and "_per_pos" not in line and "{" in line}
    assert values["vllm:spec_decode_num_drafts_total"] > 0
    assert 0 < values["vllm:spec_decode_num_accepted_tokens_total"] <= values["vllm:spec_decode_num_draft_tokens_total"]
    assert 'position="0"' in text


def test_loadtest_against_the_server(server, capsys):
    report = asyncio.run(run_loadtest(server.url, concurrency=2, requests=4, max_tokens=6, prompts=PROMPTS,
                                      timeout=60, api_key=KEY, ignore_eos=True))
    assert report["completed"] == 4 and report["failed"] == 0 and report["total_output_tokens"] == 24
    assert report["request_throughput"] > 0 and report["mean_ttft_ms"] > 0 and report["p99_itl_ms"] > 0
    assert report["spec_decode"]["drafts"] >= 0
    text = format_report(report)
    for label in ("Request throughput (req/s)", "Output token throughput (tok/s)", "Mean TTFT (ms)",
                  "P90 TPOT (ms)", "P99 ITL (ms)", "Acceptance rate (%)"):
        assert label in text


def test_loadtest_refuses_other_hosts(capsys):
    assert check_loopback("http://localhost:8000/") == "http://localhost:8000"
    assert check_loopback("http://[::1]:8000") == "http://[::1]:8000"
    for url in ("http://10.0.0.1:8000", "http://example.com", "ftp://127.0.0.1"):
        with pytest.raises(BadInput, match="loadtest only targets|must look like"):
            check_loopback(url)
    assert cli_main(["loadtest", "--url", "http://192.168.1.2:8000", "--requests", "1"]) == 2
    assert "only targets this machine" in capsys.readouterr().err


def test_graceful_shutdown_finishes_in_flight(tokenizer, offline):
    llm = make_llm(tokenizer)
    app = create_app(llm, served_model_name=MODEL, shutdown_timeout=30)
    srv = ServerThread(app).start()
    body = {"prompt": PROMPTS[0], "max_tokens": 60, "temperature": 0, "ignore_eos": True, "stream": True,
            "return_token_ids": True}
    with slow_engine(llm, 0.005), httpx.Client(base_url=srv.url, timeout=60, trust_env=False) as c, \
            httpx.Client(base_url=srv.url, timeout=60, trust_env=False) as other:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            srv.drain()  # what SIGTERM does
            refused = other.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
            rest = [first] + [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in rest[:-1]]
    ids = [t for ch in chunks for t in ch["choices"][0].get("token_ids", [])]
    assert ids == offline(PROMPTS[0], 60).token_ids
    srv.thread.join(20)
    assert not srv.thread.is_alive(), "the server did not exit after draining"


def test_shutdown_timeout_cuts_long_requests(tokenizer):
    llm = make_llm(tokenizer)
    app = create_app(llm, served_model_name=MODEL, shutdown_timeout=0.0)
    srv = ServerThread(app).start()
    body = {"prompt": "x", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with slow_engine(llm), httpx.Client(base_url=srv.url, timeout=60, trust_env=False) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            srv.drain()
            rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and "shutdown timeout" in rest[-2]
    srv.thread.join(20)
    assert not srv.thread.is_alive()


def test_tokenizing_runs_off_the_event_loop(server, http):
    """While one request's prompt is being tokenized (made slow here), /health still answers
    at once: tokenizing and chat templates run in a worker thread, not on the loop."""
    tok = server.llm.tokenizer
    real = type(tok).encode
    started = threading.Event()

    def slow_encode(self, *args, **kwargs):
        started.set()
        time.sleep(1.5)
        return real(self, *args, **kwargs)

    type(tok).encode = slow_encode
    try:
        t = threading.Thread(target=lambda: http.post("/tokenize", json={"prompt": "hello"}))
        t.start()
        assert started.wait(10)
        t0 = time.monotonic()
        assert http.get("/health").status_code == 200
        assert time.monotonic() - t0 < 0.2
        t.join(10)
    finally:
        type(tok).encode = real


def test_a_prompt_too_long_to_fit_is_refused_before_tokenizing(server, http):
    state = server.app.state.draftwise
    chars = state.max_token_chars * state.max_model_len + 1
    r = http.post("/tokenize", json={"prompt": "x" * min(chars, 15_000)})
    if chars <= 15_000:  # the body cap of this server is 16 KiB
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    from draftwise.server.generation import check_text_length
    from draftwise.server.errors import APIError

    with pytest.raises(APIError, match="maximum context length"):
        check_text_length(state, 3_500_000, "prompt")


def test_serve_passes_quantization_to_the_model(monkeypatch):
    import draftwise.api

    seen = {}

    class Stop(Exception):
        pass

    def fake_llm(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(draftwise.api, "LLM", fake_llm)
    with pytest.raises(Stop):
        cli_main(["serve", "--model", "smollm2-135m", "--quantization", "w8a8-all", "--port", "0"])
    assert seen["quantization"] == "w8a8-all"


def test_streaming_holds_back_only_what_could_begin_a_stop_string():
    from draftwise.server.engine_loop import held_back

    assert held_back("hello wor", ["world peace"]) == 3
    assert held_back("hello there", ["x" * 10_000]) == 0  # a long stop string holds back nothing it cannot start
    assert held_back("abab", ["abac"]) == 2
    assert held_back("", ["a"]) == 0 and held_back("xa", ["ab", "xab"]) == 2


def test_logprobs_of_partial_character_tokens_keep_their_bytes(tokenizer):
    """Tokens that are part of a multi-byte character: chat's `bytes` are the token's own
    raw bytes (not U+FFFD's), and completions' top_logprobs keys do not collide."""
    from draftwise.sampling import TokenLogprob
    from draftwise.server.logprobs import LogprobFormatter

    fmt = LogprobFormatter(tokenizer)  # conftest's byte tokenizer: token id = byte value
    items = [TokenLogprob(0xE2, -0.5, [(0xE2, -0.5), (0x82, -1.5), (ord("a"), -2.0)])]
    chat = fmt.chat(items)["content"][0]
    assert chat["bytes"] == [0xE2] and chat["token"] == "bytes:\\xe2"
    assert [t["bytes"] for t in chat["top_logprobs"]] == [[0xE2], [0x82], [ord("a")]]
    comp = fmt.completion(items, 0)
    assert comp["top_logprobs"][0] == {"bytes:\\xe2": -0.5, "bytes:\\x82": -1.5, "a": -2.0}
    assert comp["tokens"] == ["bytes:\\xe2"] and comp["text_offset"] == [0]


def test_second_shutdown_signal_ends_streams_cleanly_and_exits_at_once(tokenizer):
    llm = make_llm(tokenizer)
    app = create_app(llm, served_model_name=MODEL, shutdown_timeout=60.0)
    srv = ServerThread(app).start()
    body = {"prompt": "x", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with slow_engine(llm, 0.02), httpx.Client(base_url=srv.url, timeout=60, trust_env=False) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            srv.drain()  # first signal: drain (this request could run for a minute)
            t0 = time.monotonic()
            srv.drain()  # second: stop now
            rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and "second shutdown signal" in rest[-2]
    srv.thread.join(10)
    assert not srv.thread.is_alive() and time.monotonic() - t0 < 5


def test_half_sent_headers_and_bodies_do_not_hold_connections(tokenizer):
    """A connection that never finishes its headers is closed after --header-timeout; a body
    that never finishes gets 408 after --body-timeout; a normal request is unaffected."""
    import socket

    llm = make_llm(tokenizer)
    app = create_app(llm, served_model_name=MODEL, body_timeout=0.5)
    with ServerThread(app, header_timeout=0.5) as srv:
        port = srv.server.port
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-")  # headers never finish
            assert s.recv(1024) == b""  # closed by the server
        assert time.monotonic() - t0 < 5
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\": ")  # body never finishes
            reply = b""
            while b"request_timeout" not in reply:  # the head and the body may arrive apart
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # idle, then a request
            time.sleep(0.2)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(1024).startswith(b"HTTP/1.1 200")
        assert httpx.get(srv.url + "/health", trust_env=False).status_code == 200


# --- hostile clients: generated bodies ----------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20) | st.sampled_from(["\ud800", "a\udfffb", "", "yes", "0"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
SMALL_INT = st.integers(-3, 24)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "wizard", ""]) | JSON,
                                 "content": st.text(max_size=30) | st.lists(
                                     st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                            "text": st.text(max_size=10)}), max_size=2) | JSON})
FIELDS = {
    "model": st.just(MODEL) | JSON, "max_tokens": SMALL_INT | JSON, "temperature": st.floats(-1, 3) | JSON,
    "top_p": st.floats(-0.5, 1.5) | JSON, "n": SMALL_INT | JSON, "stop": st.text(max_size=3) | JSON,
    "seed": st.integers(-5, 2**64) | JSON, "stream": st.booleans() | JSON, "logprobs": SMALL_INT | JSON,
    "top_k": SMALL_INT | JSON, "min_p": st.floats(-0.5, 1.5) | JSON, "presence_penalty": st.floats(-3, 3) | JSON,
    "repetition_penalty": st.floats(-1, 12) | JSON, "ignore_eos": st.booleans() | JSON,
    "stop_token_ids": st.lists(SMALL_INT, max_size=3) | JSON, "sampling": st.sampled_from(["coupled", "rejection"])
    | JSON, "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JSON,
    "echo": st.booleans() | JSON, "bogus_field": JSON,
}
COMPLETION = st.fixed_dictionaries(
    {"prompt": st.text(max_size=40) | st.lists(st.integers(-2, 300), max_size=6) | JSON},
    optional=FIELDS)
CHAT = st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE, max_size=3) | JSON},
    optional={**FIELDS, "top_logprobs": SMALL_INT | JSON, "max_completion_tokens": SMALL_INT | JSON})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=COMPLETION | CHAT)
def test_generated_bodies_get_2xx_or_a_4xx_envelope_never_5xx(http, body):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = http.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
    elif body.get("stream") is not True:
        assert "choices" in r.json()


def test_version_and_openapi_docs(http):
    from draftwise import __version__

    assert http.get("/version").json() == {"version": __version__}
    schema = http.get("/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"] and schema["info"]["version"] == __version__
    assert http.get("/docs").status_code == 200
