"""Code written the way vLLM's documentation shows offline inference and speculative decoding
runs on draftwise with only the import line changed; and each vLLM option works as vLLM's.

The first tests are that code (calls, arguments and result fields as in vLLM's docs) on the
real smollm2-135m; the rest check the options one by one on the tiny test model.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import EOS_ID, tiny_model
from draftwise.errors import BadInput, DraftwiseError

from draftwise import LLM, SamplingParams  # the one line that differs from vLLM code: `from vllm import ...`

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def llm():
    try:
        return LLM(model=MODEL, progress=False)
    except DraftwiseError as exc:  # as tests/test_real_model.py: a failure in CI, a skip on a laptop
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the real-model tests, but {MODEL} cannot load: {exc}")
        pytest.skip(f"cannot load {MODEL}: {exc}")


# --- vLLM's documented usage ---------------------------------------------------------------


def test_offline_inference_as_in_vllm_quickstart(llm):
    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    sampling_params = SamplingParams(temperature=0.8, top_p=0.95)
    outputs = llm.generate(prompts, sampling_params)
    seen = []
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        seen.append((prompt, generated_text))
    assert [p for p, _ in seen] == prompts
    for output in outputs:
        out = output.outputs[0]
        assert isinstance(out.text, str) and out.text
        assert out.index == 0 and out.finish_reason in ("stop", "length") and out.finished()
        assert len(out.token_ids) <= 16  # vLLM's default max_tokens
        assert out.cumulative_logprob is None and out.logprobs is None  # not asked for
        assert output.prompt_token_ids == llm.tokenizer.encode(output.prompt) and output.finished


def test_defaults_are_vllms():
    sp = SamplingParams()
    assert (sp.temperature, sp.max_tokens, sp.top_p, sp.top_k, sp.n, sp.min_tokens) == (1.0, 16, 1.0, 0, 1, 0)
    assert sp.skip_special_tokens and not sp.include_stop_str_in_output and sp.logit_bias == {}
    SamplingParams(top_k=-1, max_tokens=None)  # vLLM's "off" and "to the end of the context"


def test_chat_as_in_vllm_docs(llm):
    sampling_params = SamplingParams(temperature=0.5, seed=3)
    conversation = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello! How can I assist you today?"},
        {"role": "user", "content": "Write an essay about the importance of higher education."},
    ]
    outputs = llm.chat(conversation, sampling_params=sampling_params, use_tqdm=False)
    assert len(outputs) == 1 and outputs[0].outputs[0].text
    again = llm.chat(conversation, sampling_params=sampling_params, use_tqdm=False,
                     chat_template_kwargs={"enable_thinking": False})  # Qwen3's switch; this template ignores it
    assert again[0].outputs[0].token_ids == outputs[0].outputs[0].token_ids  # seeded: the same sample


@pytest.mark.parametrize("speculative_config", [
    {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4},
    {"model": MODEL, "num_speculative_tokens": 5},  # vLLM: a model without a method is a draft model
    {"method": "eagle3", "model": "smollm2-135m-eagle", "draft_tensor_parallel_size": 1,
     "num_speculative_tokens": 2},
], ids=["ngram", "draft-model", "eagle3"])
def test_speculative_decoding_as_in_vllm_docs(llm, speculative_config):
    prompts = ["The future of AI is", "def fibonacci(n):"]
    sampling_params = SamplingParams(temperature=0, max_tokens=24)
    spec = LLM(model=MODEL, tensor_parallel_size=1, speculative_config=speculative_config, progress=False)
    outputs = spec.generate(prompts, sampling_params)
    plain = llm.generate(prompts, sampling_params)
    for output, reference in zip(outputs, plain):
        prompt = output.prompt
        generated_text = output.outputs[0].text
        assert prompt == reference.prompt and generated_text == reference.outputs[0].text
        assert output.outputs[0].token_ids == reference.outputs[0].token_ids


def test_n_samples_logprobs_and_prompt_dicts_as_vllm(llm):
    params = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=6, logprobs=2)
    [out] = llm.generate({"prompt": "Once upon a time"}, params)
    assert [c.index for c in out.outputs] == [0, 1] and out.outputs[0].token_ids != out.outputs[1].token_ids
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids)
        for token, position in zip(c.token_ids, c.logprobs):
            assert token in position and 2 <= len(position) <= 3  # the sampled token and the 2 best
            chosen = position[token]
            assert chosen.decoded_token == llm.tokenizer.decode([token]) and chosen.rank >= 1
            assert {p.rank for t, p in position.items() if t != token} <= {1, 2}
            assert len(position) == (2 if chosen.rank <= 2 else 3)
        assert c.cumulative_logprob == pytest.approx(sum(p[t].logprob for t, p in zip(c.token_ids, c.logprobs)))
    ids = llm.tokenizer.encode("Once upon a time")
    by_ids = llm.generate([{"prompt_token_ids": ids}], params)[0]
    assert by_ids.prompt is None and by_ids.prompt_token_ids == ids
    assert [c.token_ids for c in by_ids.outputs] == [c.token_ids for c in out.outputs]


def test_skip_special_tokens_off_keeps_the_eos_text(llm):
    params = SamplingParams(temperature=0, max_tokens=160, skip_special_tokens=False)
    [out] = llm.chat([{"role": "user", "content": "Say hi."}], params)
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason is None  # EOS: no stop reason, as vLLM
    [listed] = llm.chat([{"role": "user", "content": "Say hi."}],
                        params.model_copy(update={"stop_token_ids": [c.token_ids[-1]]}))
    assert listed.outputs[0].token_ids == c.token_ids and listed.outputs[0].stop_reason is None  # EOS, listed too
    assert c.text.endswith(llm.tokenizer.decode([c.token_ids[-1]]))
    assert llm.chat([{"role": "user", "content": "Say hi."}], params.model_copy(
        update={"skip_special_tokens": True}))[0].outputs[0].text == llm.tokenizer.decode(
        c.token_ids, skip_special_tokens=True)


# --- engine arguments ----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, words", [
    ({"gpu_memory_utilization": 0.9}, ["gpu_memory_utilization", "max_num_seqs"]),
    ({"tensor_parallel_size": 2}, ["tensor_parallel_size", "--replicas"]),
    ({"trust_remote_code": True}, ["trust_remote_code"]),
    ({"enable_prefix_caching": True}, ["enable_prefix_caching"]),
    ({"no_such_argument": 1}, ["unknown argument", "no_such_argument"]),
])
def test_vllm_arguments_without_meaning_here_are_refused_by_name(kwargs, words):
    with pytest.raises(BadInput) as e:
        LLM(model="no-model-needed", **kwargs)  # refused before anything loads
    assert all(w in str(e.value) for w in words), str(e.value)


def test_max_num_seqs_and_max_batch_size_must_agree():
    with pytest.raises(BadInput, match="max_num_seqs"):
        LLM(model="no-model-needed", max_num_seqs=4, max_batch_size=8)


# --- sampling options on the tiny model ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from conftest import byte_tokenizer

    return tiny_model("llama", torch.float32, seed=0), byte_tokenizer()


SPECS = [None, {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "adaptive": False},
         {"method": "layer_skip", "num_layers": 1, "num_speculative_tokens": 3, "adaptive": False}]


def run(tiny, params, spec=None, prompts=("abcabc", "hello there"), max_model_len=None, seed=None):
    model, tok = tiny
    llm = LLM.from_model(model, tok, speculative_config=spec, max_batch_size=2, max_model_len=max_model_len,
                         seed=seed)
    return llm.generate(list(prompts), params)


@pytest.mark.parametrize("spec", SPECS, ids=["plain", "ngram", "layer_skip"])
def test_min_tokens_bans_eos_and_stop_tokens_until_reached(tiny, spec):
    free = run(tiny, SamplingParams(temperature=0, max_tokens=12))
    first = [o.token_ids[0] for o in free]
    params = SamplingParams(temperature=0, max_tokens=12, min_tokens=4, stop_token_ids=first)
    got = run(tiny, params, spec)
    for out in got:
        assert not (set(first) | {EOS_ID}) & set(out.token_ids[:4])
        if out.finish_reason == "stop":
            last, reason = out.token_ids[-1], out.outputs[0].stop_reason
            assert len(out.token_ids) > 4 and (reason == last in first or (last == EOS_ID and reason is None))
    assert any(o.finish_reason == "stop" for o in got)  # the ban lifted: a stop token came after all
    assert [o.token_ids for o in got] == [o.token_ids for o in run(tiny, params)]  # speculation changes nothing


@pytest.mark.parametrize("spec", SPECS, ids=["plain", "ngram", "layer_skip"])
def test_logit_bias_moves_greedy_and_sampled_choices(tiny, spec):
    forced = run(tiny, SamplingParams(temperature=0, max_tokens=8, logit_bias={ord("z"): 100.0}), spec)
    assert all(o.token_ids == [ord("z")] * 8 for o in forced)
    plain = run(tiny, SamplingParams(temperature=0, max_tokens=8))
    banned = {o.token_ids[0]: -100.0 for o in plain}
    got = run(tiny, SamplingParams(temperature=0, max_tokens=8, logit_bias=banned), spec)
    assert all(not set(banned) & set(o.token_ids) for o in got)
    seeded = SamplingParams(temperature=1.0, seed=5, max_tokens=8, logit_bias=banned)
    assert [o.token_ids for o in run(tiny, seeded, spec)] == [o.token_ids for o in run(tiny, seeded)]


def test_logit_bias_out_of_range_is_refused(tiny):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: 500.0})
    with pytest.raises(BadInput, match="logit_bias"):
        run(tiny, SamplingParams(logit_bias={10**6: 1.0}))


def test_max_tokens_none_runs_to_the_end_of_the_context(tiny):
    [out] = run(tiny, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), prompts=["abc"],
                max_model_len=20)
    assert len(out.token_ids) == 20 - len(out.prompt_token_ids) and out.finish_reason == "length"


def test_stop_string_kept_with_include_stop_str_in_output(tiny):
    [free] = run(tiny, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), prompts=["abcabc"])
    stop = free.text[3:5]
    assert len(stop) == 2 and EOS_ID not in free.token_ids[:5]
    without = run(tiny, SamplingParams(temperature=0, max_tokens=12, stop=[stop]), prompts=["abcabc"])[0].outputs[0]
    kept = run(tiny, SamplingParams(temperature=0, max_tokens=12, stop=[stop], include_stop_str_in_output=True),
               prompts=["abcabc"])[0].outputs[0]
    assert without.text == free.text[: free.text.index(stop)] and without.stop_reason == stop
    assert kept.text == without.text + stop and kept.stop_reason == stop


def test_engine_seed_makes_unseeded_sampling_reproducible(tiny):
    params = SamplingParams(temperature=1.0, max_tokens=10)
    a = [o.token_ids for o in run(tiny, params, seed=7)]
    assert a == [o.token_ids for o in run(tiny, params, seed=7)]
    assert a != [o.token_ids for o in run(tiny, params, seed=8)]


def test_chat_template_kwargs_reach_the_template(tiny):
    model, tok = tiny
    llm = LLM.from_model(model, tok)
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if shout %}!!{% endif %}"
    msgs = [{"role": "user", "content": "hi"}]
    quiet = llm.chat_prompt(msgs, chat_template=template)
    loud = llm.chat_prompt(msgs, chat_template=template, chat_template_kwargs={"shout": True})
    assert tok.decode(quiet) == "hi" and tok.decode(loud) == "hi!!"
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=3), chat_template=template,
                   chat_template_kwargs={"shout": True})
    assert out[0].prompt_token_ids == loud


def test_vllm_speculative_config_spellings():
    from draftwise.config import parse_speculative_config

    assert parse_speculative_config({"model": "[ngram]", "num_speculative_tokens": 3}).method == "ngram"
    assert parse_speculative_config({"model": "x", "num_speculative_tokens": 3}).method == "draft_model"
    assert parse_speculative_config({"method": "eagle3", "model": "h"}).method == "eagle"
    with pytest.raises(BadInput, match="draft_tensor_parallel_size"):
        parse_speculative_config({"method": "ngram", "draft_tensor_parallel_size": 2})
