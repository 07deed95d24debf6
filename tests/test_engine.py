"""Plain generation through the engine and the Python API; the engine's counters against a scripted target."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from conftest import EOS_ID, FixedAcceptance, ScriptedTarget, script_next, tiny_model
from draftwise.api import LLM
from draftwise.errors import BadInput
from draftwise.sampling import SamplingParams


def hf_twin(model) -> tf.PreTrainedModel:
    """The same weights in transformers' own Llama implementation."""
    cfg = model.config
    hf_cfg = tf.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False, eos_token_id=None,
    )
    hf = tf.LlamaForCausalLM(hf_cfg).float().eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    return hf


def test_greedy_equals_transformers_generate(tokenizer):
    model = tiny_model("llama", torch.float32)
    llm = LLM.from_model(model, tokenizer)
    prompt = tokenizer.encode("The quick brown fox")
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))[0]
    hf = hf_twin(model)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, min_new_tokens=40)
    assert out.token_ids == ref[0, len(prompt):].tolist()
    assert out.finish_reason == "length"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_of_different_lengths_equals_one_by_one(tokenizer, dtype):
    llm = LLM.from_model(tiny_model("qwen2", dtype), tokenizer, max_batch_size=4)
    prompts = ["a", "hello there, friend", "xyz xyz", "The rain in Spain stays mainly"]
    params = SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True)
    together = llm.generate(prompts, params)
    for p, out in zip(prompts, together):
        assert llm.generate([p], params)[0].token_ids == out.token_ids


def test_more_prompts_than_rows_queue_and_finish(tokenizer):
    llm = LLM.from_model(tiny_model(), tokenizer, max_batch_size=2)
    outs = llm.generate([f"prompt {i}" for i in range(5)], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [8] * 5
    assert llm.engine.free_rows == [0, 1] and not llm.engine.running


def test_seeded_sampling_is_reproducible_and_seeds_differ(tokenizer):
    llm = LLM.from_model(tiny_model(std=0.05), tokenizer)
    def run(seed):
        p = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.95, seed=seed, ignore_eos=True)
        return llm.generate(["once upon"], p)[0].token_ids
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_stop_token_ids_string_and_eos(tokenizer):
    llm = LLM.from_model(tiny_model(), tokenizer)
    free = llm.generate(["stop test"], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0]
    third = free.token_ids[2]
    first_at = free.token_ids.index(third)
    out = llm.generate(["stop test"], SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[third]))[0]
    assert out.token_ids == free.token_ids[: first_at + 1] and out.finish_reason == "stop"
    stop = free.text[5:8]
    out = llm.generate(["stop test"], SamplingParams(temperature=0.0, max_tokens=30, stop=[stop], ignore_eos=True))[0]
    assert out.text == free.text[: free.text.index(stop)] and out.finish_reason == "stop"
    # EOS: bias the head so that EOS is the greedy choice
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[EOS_ID] = model.model.embed_tokens.weight.new_zeros(model.config.hidden_size)
        model.lm_head.weight[EOS_ID, 0] = 1e4
        model.model.norm.weight.fill_(1.0)
    out = LLM.from_model(model, tokenizer).generate(["x"], SamplingParams(temperature=0.0, max_tokens=30))[0]
    assert out.finish_reason == "stop" and len(out.token_ids) <= 30


def test_chat_template_is_applied(tokenizer):
    llm = LLM.from_model(tiny_model(), tokenizer)
    ids = llm.chat_prompt([{"role": "user", "content": "hi"}])
    assert tokenizer.decode(ids) == "<user>hi\n<assistant>"


def test_bad_inputs_raise_clear_errors(tokenizer):
    llm = LLM.from_model(tiny_model(), tokenizer, max_model_len=64)
    with pytest.raises(BadInput, match="maximum context length is 64 tokens"):
        llm.generate(["x" * 60], SamplingParams(temperature=0.0, max_tokens=10))
    with pytest.raises(BadInput, match="empty"):
        llm.generate([[]], SamplingParams(temperature=0.0, max_tokens=128))
    with pytest.raises(BadInput, match="token ids"):
        llm.generate([[1, 999]], SamplingParams(temperature=0.0, max_tokens=128))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(max_tokens=128, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=0.0, max_tokens=128, top_p=0)


@pytest.mark.parametrize("spec", [None, {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}])
def test_logprobs_are_the_models_own(tokenizer, spec):
    """Each output token's logprob (and the top alternatives) equals the log-softmax of the
    model's logits at that position, bit for bit the same with speculation as without."""
    model = tiny_model(std=0.1)
    prompt = "abcabcabcabcabc"
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2)
    out = LLM.from_model(model, tokenizer, speculative_config=spec).generate(prompt, params)[0]
    plain = LLM.from_model(model, tokenizer).generate(prompt, params)[0]
    assert [(x.token, x.logprob, x.top) for x in out.logprobs] == [(x.token, x.logprob, x.top) for x in plain.logprobs]
    if spec:
        assert out.stats["accepted_tokens"] > 0
    ids = torch.tensor([out.prompt_token_ids + out.token_ids[:-1]])
    logits = model(ids, torch.arange(ids.shape[1])[None], model.new_cache(1, 64)).logits[0, -20:]
    ref = torch.log_softmax(logits.float(), -1)
    for i, x in enumerate(out.logprobs):
        assert x.token == out.token_ids[i] and x.logprob == pytest.approx(ref[i, x.token].item(), abs=1e-4)
        assert [t for t, _ in x.top] == ref[i].topk(2).indices.tolist()
    stopped = LLM.from_model(model, tokenizer, speculative_config=spec).generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=0, stop_token_ids=[out.token_ids[5]]))[0]
    assert len(stopped.logprobs) == len(stopped.token_ids) <= 6 and stopped.logprobs[0].top == []
    assert LLM.from_model(model, tokenizer).generate(prompt, SamplingParams(temperature=0.0, max_tokens=3))[0].logprobs is None


def test_stop_string_check_decodes_only_the_newest_tokens(tokenizer, monkeypatch):
    """Checking stop strings costs the same at any output length (it decoded the whole
    output at every token before: 1,500 tokens took 38 s instead of 31)."""
    llm = LLM.from_model(tiny_model(), tokenizer)
    decoded = []
    real = type(tokenizer).decode

    def counting(self, ids, *args, **kwargs):
        decoded.append(len(ids))
        return real(self, ids, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "decode", counting)
    out = llm.generate(["abc"], SamplingParams(temperature=0.0, max_tokens=120, stop=["never-to-appear"], ignore_eos=True))[0]
    assert len(out.token_ids) == 120
    window = len("never-to-appear") + 8
    assert max(decoded) <= 120 and sum(decoded) <= 120 * window + 2 * 120  # the final text decode included
    monkeypatch.undo()
    free = llm.generate(["abc"], SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))[0].text
    stop = free[40:43]
    cut = llm.generate(["abc"], SamplingParams(temperature=0.0, max_tokens=60, stop=[stop], ignore_eos=True))[0]
    assert cut.text == free[: free.index(stop)] and cut.finish_reason == "stop"



@pytest.mark.parametrize("tree", [False, True])
def test_counters_are_exactly_what_the_scripted_acceptance_sets(tokenizer, tree):
    """Against a scripted target, drafts of 4 of which exactly 2 are right: every step
    commits 3 tokens (2 accepted + the bonus), the last one's draft is cut to the room
    left, and the output is the script's, as plain decoding gives it."""
    from draftwise.engine.controller import FixedController
    from draftwise.engine.engine import Engine

    target = ScriptedTarget()
    prompt = list(b"abc")
    params = SamplingParams(temperature=0.0, max_tokens=31, ignore_eos=True)
    plain = Engine(target, tokenizer)
    plain_req = plain.add_request(prompt, params)
    plain.run_until_done()
    engine = Engine(target, tokenizer, proposer=FixedAcceptance([2], tree=tree), controller=FixedController(4),
                    max_speculative_tokens=4)
    req = engine.add_request(prompt, params)
    engine.run_until_done()
    want, t = [], prompt[-1]
    for _ in range(31):
        t = script_next(t)
        want.append(t)
    assert req.output_ids == plain_req.output_ids == want
    s = req.stats
    assert (s.target_passes, s.drafts, s.draft_tokens, s.accepted_tokens) == (11, 10, 9 * 4 + 2, 20)
    assert s.num_speculative_tokens == [4] * 9 + [2]  # room for 2 drafted + the bonus in the last step
    assert s.accepted_per_position == [10, 10] and s.rejected_per_position == [0, 0, 9]
    assert s.drafted_per_position == [10, 10, 9, 9]
    assert s.to_dict()["mean_accepted_length"] == 3.0 and plain_req.stats.target_passes == 31
