"""Structured output stays exact under speculation.

Plain constrained decoding (the target's logits masked by the grammar at every step, no
draft) is the reference. With every speculator, in chains and trees, batched beside rows
with other grammars and rows with none, greedy and seeded-sampled output is that
reference token for token; every output satisfies its constraint; a draft token the
grammar forbids never reaches verification; forced tokens are drafted for free and
counted; the matcher's rollback leaves the accepted state; bad constraints are refused.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import draftwise.engine.engine as engine_module
from conftest import EOS_ID, OracleTree
from draftwise.api import LLM
from draftwise.constraints import Matcher, StructuredOutputsParams, cached_grammars, compile_constraint, fit_draft
from draftwise.errors import BadInput
from draftwise.sampling import SamplingParams
from test_coupled import METHODS, sharp_target, speculative_llm

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA_A = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 5}, "n": {"type": "integer", "minimum": 0, "maximum": 50},
                   "ok": {"type": "boolean"}},
    "required": ["name", "n", "ok"], "additionalProperties": False,
}
SCHEMA_B = {
    "type": "object",
    "properties": {"tags": {"type": "array", "items": {"enum": ["x", "yy", "zzz"]}, "minItems": 1, "maxItems": 3},
                   "kind": {"enum": ["cat", "dog"]}},
    "required": ["tags", "kind"], "additionalProperties": False,
}
REGEX = r"[a-c]{2,6}-[0-9]{1,3}"
CHOICE = ["abcabc", "abd", "xyz"]

PROMPTS = ["abcabcabcabcabc", "the cat sat on the mat. the cat sat on the", "x = 1\nx = 1\nx = 1\n", "zz",
           "abd abd abd"]
CONSTRAINTS = [StructuredOutputsParams(json=SCHEMA_A), StructuredOutputsParams(json=json.dumps(SCHEMA_B)),
               StructuredOutputsParams(regex=REGEX), None, StructuredOutputsParams(choice=CHOICE)]


def params(mode: str) -> list[SamplingParams]:
    """Per row: its constraint (row 3 none), greedy or seeded sampling."""
    out = []
    for i, c in enumerate(CONSTRAINTS):
        extra = {"max_tokens": 24, "ignore_eos": True} if c is None else {"max_tokens": 64}
        sampling = {"temperature": 0.0} if mode == "greedy" else {"temperature": 0.8, "top_k": 20, "seed": 30 + i}
        out.append(SamplingParams(structured_outputs=c, **sampling, **extra))
    return out


def check_satisfied(outputs) -> None:
    """Every constrained output is complete and satisfies its constraint."""
    for out, c in zip(outputs, CONSTRAINTS):
        if c is None:
            continue
        assert out.finish_reason == "stop", (out.text, c)
        if c.kind == "json":
            jsonschema.validate(json.loads(out.text), c.schema())
        elif c.kind == "regex":
            assert re.fullmatch(REGEX, out.text), out.text
        else:
            assert out.text in CHOICE, out.text


def plain(target, tokenizer, sps) -> list:
    """The reference: each request alone, plain constrained decoding."""
    llm = LLM.from_model(target, tokenizer, max_batch_size=1)
    return [llm.generate([p], sp)[0] for p, sp in zip(PROMPTS, sps)]


def adaptive(target, tokenizer, batch: int) -> LLM:
    from test_adaptive import adaptive_llm

    return adaptive_llm(target, tokenizer, batch=batch)


@pytest.mark.parametrize("mode", ["greedy", "seeded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS + ["adaptive"])
def test_constrained_output_is_plain_constrained_output_with_every_speculator(tokenizer, method, dtype, mode):
    target = sharp_target(dtype)
    sps = params(mode)
    reference = plain(target, tokenizer, sps)
    check_satisfied(reference)
    llm = adaptive(target, tokenizer, 5) if method == "adaptive" else speculative_llm(method, target, tokenizer, 5)
    try:
        got = llm.generate(PROMPTS, sps)  # five rows side by side: four grammars and one row without
    finally:
        llm.close()
    assert [o.token_ids for o in got] == [o.token_ids for o in reference]
    # the schema's keys, quotes and braces were drafted by the grammar, whatever the speculator
    assert all(got[i].stats.get("forced_tokens", 0) > 0 for i in (0, 1)), [o.stats for o in got]
    assert "forced_tokens" not in got[3].stats  # the unconstrained row has nothing forced


def constrained_oracle(target, tokenizer, sps, reference, nodes: int = 8):
    """Run with conftest's OracleTree (the reference as one path among decoys), spying on
    every verification: returns (requests, the draft paths verified per constrained row)."""
    from draftwise.engine.controller import FixedController
    from draftwise.engine.engine import Engine

    ids = [tokenizer.encode(p) for p in PROMPTS]
    proposer = OracleTree({tuple(i): list(r.token_ids) for i, r in zip(ids, reference)}, target.config.vocab_size)
    engine = Engine(target, tokenizer, proposer=proposer, controller=FixedController(nodes), max_batch_size=5,
                    max_speculative_tokens=nodes)
    return engine, [engine.add_request(i, sp) for i, sp in zip(ids, sps)]


def test_forbidden_draft_tokens_are_never_verified_and_trees_stay_exact(tokenizer, monkeypatch):
    """The oracle's decoys (mostly forbidden by the grammar) are cut before verification:
    every node verified is a path the grammar takes from the committed state, checked
    with the request's own matcher at that moment; the output is the reference and the
    oracle's path is accepted."""
    target = sharp_target(torch.float32)
    sps = params("greedy")
    reference = plain(target, tokenizer, sps)
    engine, reqs = constrained_oracle(target, tokenizer, sps, reference)
    real = engine_module.target_step
    seen = {"nodes": 0, "cut": 0}

    def spy(model, cache, requests, draft, hidden_layers, allowed):
        for i, req in enumerate(requests):
            if req.constraint is None or not draft.tokens[i]:
                continue
            tokens, parents = draft.tokens[i], draft.parents[i]
            for j in range(len(tokens)):
                path, k = [], j
                while k >= 0:
                    path.append(tokens[k])
                    k = parents[k] if parents is not None else k - 1
                assert req.constraint.accepts(path[::-1]), (req.request_id, path[::-1])
                seen["nodes"] += 1
        return real(model, cache, requests, draft, hidden_layers, allowed)

    def counting_fit(requests, draft, limits):
        out = fit_batch(requests, draft, limits)
        seen["cut"] += sum(len(a) for a in draft.tokens) - sum(len(a) for a in out.draft.tokens)
        return out

    from draftwise.engine.constrained import fit_batch

    monkeypatch.setattr(engine_module, "target_step", spy)
    monkeypatch.setattr(engine_module, "fit_batch", counting_fit)
    engine.run_until_done()
    assert [r.output_ids for r in reqs] == [o.token_ids for o in reference]
    assert seen["nodes"] > 0 and seen["cut"] > 0, seen
    accepted = sum(r.stats.accepted_tokens for r in reqs)
    assert accepted >= 0.5 * sum(len(o.token_ids) for o in reference), accepted


def test_batched_grammars_mixed_with_plain_rows_do_not_change_the_plain_rows(tokenizer):
    """Unconstrained rows beside constrained ones: the same tokens as without them."""
    target = sharp_target(torch.float32)
    sps = params("seeded")
    llm = speculative_llm("ngram", target, tokenizer, 5)
    mixed = llm.generate(PROMPTS, sps)
    unconstrained = [sp.model_copy(update={"structured_outputs": None, "max_tokens": 24, "ignore_eos": True})
                     for sp in sps]
    alone = llm.generate(PROMPTS, unconstrained)
    assert mixed[3].token_ids == alone[3].token_ids
    assert mixed[0].token_ids != alone[0].token_ids  # the constraint did something


def test_guided_decoding_spelling_and_grammar_kind(tokenizer):
    target = sharp_target(torch.float32)
    grammar = 'start: "id=" /[0-9]{2}/ ("," /[0-9]{2}/)*\n'
    sp = SamplingParams(temperature=0.0, max_tokens=20, guided_decoding=StructuredOutputsParams(grammar=grammar))
    out = LLM.from_model(target, tokenizer, max_batch_size=1).generate(["id="], sp)[0]
    assert sp.structured_outputs is not None and re.fullmatch(r"id=[0-9]{2}(,[0-9]{2})*", out.text), out.text
    assert out.finish_reason in ("stop", "length")


def test_a_constraint_that_cannot_finish_in_max_tokens_ends_with_length(tokenizer):
    target = sharp_target(torch.float32)
    sp = SamplingParams(temperature=0.0, max_tokens=6, structured_outputs=StructuredOutputsParams(json=SCHEMA_A))
    for llm in (LLM.from_model(target, tokenizer, max_batch_size=1), speculative_llm("ngram", target, tokenizer, 1)):
        out = llm.generate(["abc"], sp)[0]
        assert out.finish_reason == "length" and len(out.token_ids) == 6


def test_min_tokens_with_a_grammar_gives_valid_output_and_no_nan(tokenizer):
    """min_tokens bans EOS, a finished grammar allows only EOS: the grammar wins, no NaN."""
    target = sharp_target(torch.float32)
    sp = SamplingParams(temperature=0.7, seed=1, max_tokens=20, min_tokens=15,
                        structured_outputs=StructuredOutputsParams(choice=["ab"]))
    out = LLM.from_model(target, tokenizer, max_batch_size=1).generate(["x"], sp)[0]
    assert out.text == "ab" and out.finish_reason == "stop"


# --- the constraint room itself ---------------------------------------------------------------


def compiled(tokenizer, spec: StructuredOutputsParams):
    return compile_constraint(spec, tokenizer, 260, [EOS_ID])


def test_bad_constraints_are_refused_naming_what_is_wrong(tokenizer):
    for spec, word in [(StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "nope"}}}),
                        "json"),
                       (StructuredOutputsParams(regex="([a-z"), "regex"),
                       (StructuredOutputsParams(grammar="start: ("), "grammar")]:
        with pytest.raises(ValueError, match=word):
            compiled(tokenizer, spec)
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="json"):
        StructuredOutputsParams(json="{not json").schema()
    # through the engine: a ValueError (BadInput) before any work
    llm = LLM.from_model(sharp_target(torch.float32), tokenizer, max_batch_size=1)
    with pytest.raises(BadInput, match="regex"):
        llm.generate(["a"], SamplingParams(structured_outputs=StructuredOutputsParams(regex="(")))


def test_a_grammar_that_compiles_too_long_is_refused(tokenizer, monkeypatch):
    import time

    import draftwise.constraints.compile as compile_module

    monkeypatch.setattr(compile_module, "COMPILE_SECONDS", 0.05)
    real = compile_module._build

    def slow(*args):
        time.sleep(0.5)
        return real(*args)

    monkeypatch.setattr(compile_module, "_build", slow)
    with pytest.raises(BadInput, match="did not compile within"):
        compiled(tokenizer, StructuredOutputsParams(regex="slow[0-9]+"))
    # the overrunning compile blocks no later one
    monkeypatch.setattr(compile_module, "_build", real)
    monkeypatch.setattr(compile_module, "COMPILE_SECONDS", 10.0)
    assert compiled(tokenizer, StructuredOutputsParams(regex="fast[0-9]+")) is not None


def test_the_same_constraint_twice_compiles_once(tokenizer, monkeypatch):
    import draftwise.constraints.compile as compile_module

    calls = []
    real = compile_module._build
    monkeypatch.setattr(compile_module, "_build", lambda *a: calls.append(1) or real(*a))
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"unique_key_7": {"type": "integer"}}})
    first = compiled(tokenizer, spec)
    again = compiled(tokenizer, StructuredOutputsParams(json=json.dumps(spec.json)))
    assert len(calls) == 1 and first is again
    assert cached_grammars(tokenizer) >= 1


def walk(m: Matcher, rng_tokens: list[int], limit: int = 40) -> list[int]:
    """Allowed tokens chosen by index into each state's allowed set (a random walk)."""
    out = []
    for pick in rng_tokens[:limit]:
        if m.stopped:
            break
        allowed = torch.nonzero(m.allowed_after([])[0]).flatten().tolist()
        if not allowed:
            break
        t = allowed[pick % len(allowed)]
        m.advance(t)
        out.append(t)
    return out


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=30), st.lists(st.integers(0, 259), max_size=12),
       st.integers(0, 12))
def test_fitting_a_draft_leaves_the_matcher_where_it_was(tokenizer, committed, draft, limit):
    """Whatever the committed prefix and the (random, mostly forbidden) draft: after
    fitting, the matcher allows exactly what a fresh matcher fed the committed prefix
    allows; the fitted chain is a path the grammar takes, each mask row is the state
    after the nodes before it, and accepting any prefix of it leaves the accepted state."""
    grammar = compiled(tokenizer, StructuredOutputsParams(json=SCHEMA_B))
    m = Matcher(grammar)
    prefix = walk(m, committed)
    before = m.allowed_after([])
    fit = fit_draft(m, draft, None, None, limit)
    assert torch.equal(m.allowed_after([]), before)
    assert len(fit.tokens) <= limit and m.accepts(fit.tokens)
    assert torch.equal(fit.allowed, m.allowed_after(fit.tokens))
    for accepted in range(len(fit.tokens) + 1):  # commit an accepted prefix, as the engine does
        fresh = Matcher(grammar)
        for t in prefix + fit.tokens[:accepted]:
            fresh.advance(t)
        assert torch.equal(fresh.allowed_after([]), m.allowed_after(fit.tokens[:accepted])[-1:].expand_as(
            fresh.allowed_after([])))


def test_a_stop_token_drafted_past_the_grammars_end_is_rolled_back_without_a_committed_token(tokenizer):
    # llguidance takes a stop token where the grammar has already stopped without recording
    # it, and its rollback then undid a committed token (hypothesis found it: 'ab-0000' + eos)
    grammar = compiled(tokenizer, StructuredOutputsParams(regex=r"(ab|ac|b[a-c]*)-[0-9]{1,4}"))
    m = Matcher(grammar)
    for t in b"ab-00":
        m.advance(t)
    before = m.allowed_after([])
    draft = [ord("0"), ord("0"), EOS_ID, EOS_ID]  # the grammar stops after the digits
    assert m.accepts(draft[:3])
    for t in draft:
        m.push(t)
    assert m.stopped
    m.pop(len(draft))
    assert torch.equal(m.allowed_after([]), before) and not m.stopped
    for t in b"00":
        m.advance(t)
    stopped = m.allowed_after([])
    m.push(EOS_ID)
    m.pop(1)
    assert torch.equal(m.allowed_after([]), stopped)  # a stopped state stays itself


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 10_000), max_size=20), st.lists(st.tuples(st.integers(-1, 8), st.integers(0, 259)),
                                                             max_size=10))
def test_fitting_a_tree_keeps_only_paths_the_grammar_takes(tokenizer, committed, nodes):
    grammar = compiled(tokenizer, StructuredOutputsParams(regex=r"(ab|ac|b[a-c]*)-[0-9]{1,4}"))
    m = Matcher(grammar)
    walk(m, committed)
    tokens = [t for _, t in nodes]
    parents = [min(p, j - 1) for j, (p, _) in enumerate(nodes)]  # parent-first
    before = m.allowed_after([])
    fit = fit_draft(m, tokens, parents, None, 8)
    assert torch.equal(m.allowed_after([]), before)
    for j in range(len(fit.tokens)):
        path, k = [], j
        while k >= 0:
            path.append(fit.tokens[k])
            k = fit.parents[k] if fit.parents is not None else k - 1
        path.reverse()
        assert m.accepts(path)
        assert torch.equal(fit.allowed[j + 1], m.allowed_after(path)[-1])


def test_forced_tokens_lead_the_draft_and_are_point_masses(tokenizer):
    """At the start of a schema `{"name": "` is forced: those tokens lead the fitted draft
    with one-hot rows, and a draft model's q on a kept token is renormalized to what the
    grammar allows."""
    grammar = compiled(tokenizer, StructuredOutputsParams(json=SCHEMA_A))
    m = Matcher(grammar)
    head = tokenizer.encode('{"name": "')
    forced = m.forced()
    assert forced == head
    q = torch.full((3, 260), 1.0 / 260)
    fit = fit_draft(m, head + tokenizer.encode("a"), None, torch.cat([torch.eye(260)[head], q[:1]]), 16)
    assert fit.tokens[: len(head)] == head and fit.forced[: len(head)] == list(range(len(head)))
    assert torch.equal(fit.probs[: len(head)], torch.eye(260)[head])
    kept = fit.probs[len(head)]
    assert torch.allclose(kept.sum(), torch.tensor(1.0))
    assert torch.equal(kept > 0, fit.allowed[len(head), :260])  # q restricted to the grammar's tokens


def test_renormalized_draft_sampling_gives_the_constrained_target_distribution():
    """Speculative sampling with the fitted q (q on the allowed tokens, renormalized)
    against the constrained target p samples p exactly (a chi-square-free check: the
    empirical frequencies of 20k draws are within 4 sigma of p)."""
    from draftwise.verify import verify_chain

    torch.manual_seed(0)
    vocab = 12
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[[1, 3, 4, 7, 9]] = True
    p_logits = torch.randn(vocab)
    p = torch.softmax(p_logits.masked_fill(~allowed, float("-inf")), -1)
    q_raw = torch.softmax(torch.randn(vocab), -1)
    q = q_raw * allowed
    q = q / q.sum()
    draws = 20_000
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(vocab)
    for _ in range(draws):
        tok = int(torch.multinomial(q, 1, generator=gen))
        target = torch.stack([p, p])  # row 0 at the drafted position, row 1 the bonus
        res = verify_chain([tok], q[None], target, gen)
        counts[res.tokens[0]] += 1
    freq = counts / draws
    sigma = (p * (1 - p) / draws).sqrt()
    assert torch.all((freq - p).abs() <= 4 * sigma + 1e-9), (freq, p)
    assert counts[~allowed].sum() == 0


# --- the real smollm2 ----------------------------------------------------------------------

import test_real_model  # noqa: E402

smollm2 = test_real_model.smollm2  # the fixture (fails in CI when the model cannot load)

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                   "city": {"type": "string", "maxLength": 16}, "languages": {"type": "array", "maxItems": 3,
                                                                              "items": {"type": "string", "maxLength": 12}}},
    "required": ["name", "age", "city", "languages"], "additionalProperties": False,
}
RECORDS = [
    "Maria Lopez is 34, lives in Madrid and speaks Spanish, English and French.",
    "Tom Becker (age 51) from Hamburg speaks German and Dutch.",
    "Aiko Tanaka, 27, Osaka; she speaks Japanese and English.",
]


@pytest.mark.real_model
def test_schema_output_on_the_real_model_is_exact_under_speculation(smollm2):
    """JSON extraction on SmolLM2 in bf16: plain constrained, ngram, the shipped EAGLE head
    and an oracle tree give the same tokens; every answer validates; the schema's keys are
    forced tokens."""
    from conftest import oracle_tree_outputs

    model, tok = smollm2
    bf16 = model.to(torch.bfloat16)
    try:
        convs = [[{"role": "user", "content": f"Extract name, age, city and languages as JSON.\n\n{r}"}]
                 for r in RECORDS]
        params = SamplingParams(temperature=0.0, max_tokens=128, structured_outputs=StructuredOutputsParams(json=PERSON))
        plain_llm = LLM.from_model(bf16, tok, max_batch_size=3)
        prompts = [plain_llm.chat_prompt(c) for c in convs]
        plain_out = plain_llm.generate(prompts, params)
        for o in plain_out:
            assert o.finish_reason == "stop", o.text
            jsonschema.validate(json.loads(o.text), PERSON)
        for cfg in ({"method": "ngram", "num_speculative_tokens": 4, "adaptive": False},
                    {"method": "eagle", "model": "smollm2-135m-eagle", "num_speculative_tokens": 8,
                     "adaptive": False}):
            got = LLM.from_model(bf16, tok, max_batch_size=3, speculative_config=cfg).generate(prompts, params)
            assert [o.token_ids for o in got] == [o.token_ids for o in plain_out], cfg["method"]
            assert all(o.stats.get("forced_tokens", 0) >= 10 for o in got), [o.stats for o in got]
        tree = oracle_tree_outputs(bf16, tok, prompts, params, plain_out, max_batch_size=3)
        assert [r.output_ids for r in tree] == [o.token_ids for o in plain_out]
    finally:
        model.to(torch.float32)
