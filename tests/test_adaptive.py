"""The adaptive speculator (speculators/adaptive/: proposer.py, control.py, online.py, state.py):
lossless across weight swaps, a learner that learns off the engine's thread, a controller
that follows measured acceptance, state that survives a restart, and clear refusals."""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time

import pytest
import torch

from conftest import tiny_model
from draftwise.api import LLM
from draftwise.errors import BadInput
from draftwise.sampling import SamplingParams
from draftwise.speculators.adaptive import AdaptiveProposer, Arbiter, LearnerSettings, OnlineLearner, ReplayBuffer, new_head
from draftwise.speculators.eagle import Batch, save_eagle_head
from draftwise.tree import matched_length

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["hello world hello world", "the cat sat on the mat", "abcabcabcabc", "def f(x): return x"]
FAST_LEARNER = {"min_tokens": 16, "train_every": 1, "train_share": 1.0, "swap_every": 1, "batch_size": 2, "max_len": 64}


def adaptive_llm(target, tokenizer, batch: int = 4, **cfg) -> LLM:
    spec = {"method": "adaptive", "num_speculative_tokens": 6, "learner": dict(FAST_LEARNER), **cfg}
    return LLM.from_model(target, tokenizer, speculative_config=spec, max_batch_size=batch)


def run_until_swapped(llm, prompts, params, reference, swaps: int = 2, rounds: int = 12):
    """Generate round after round (each checked against `reference`) until the learner's
    weights were swapped in at least `swaps` times while requests were running."""
    proposer = llm.engine.proposer
    for _ in range(rounds):
        outs = llm.generate(prompts, params)
        assert [o.token_ids for o in outs] == reference
        if proposer.swaps >= swaps:
            return outs
        time.sleep(0.2)
    raise AssertionError(f"only {proposer.swaps} swaps in {rounds} rounds (learner error: {proposer.learner.error})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_adaptive_equals_plain_across_weight_swaps(tokenizer, dtype):
    target = tiny_model(dtype=dtype)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = [o.token_ids for o in LLM.from_model(target, tokenizer, max_batch_size=4).generate(PROMPTS, params)]
    llm = adaptive_llm(target, tokenizer)
    try:
        run_until_swapped(llm, PROMPTS, params, plain)
        learner = llm.engine.proposer.learner
        assert learner.steps > 0 and learner.thread_ids
        assert threading.get_ident() not in learner.thread_ids  # training never ran on the engine's thread
    finally:
        llm.close()
    assert not llm.engine.proposer.learner._thread  # stopped by close


def test_batch_of_one_and_stop_conditions_stay_exact(tokenizer):
    target = tiny_model()
    params = SamplingParams(temperature=0.0, max_tokens=30, stop=["ca"], ignore_eos=False)
    plain = [o.token_ids for o in LLM.from_model(target, tokenizer, max_batch_size=1).generate(PROMPTS, params)]
    llm = adaptive_llm(target, tokenizer, batch=1)
    try:
        for _ in range(3):
            assert [o.token_ids for o in llm.generate(PROMPTS, params)] == plain
    finally:
        llm.close()


def test_sampled_adaptive_is_the_seeded_plain_output(tokenizer):
    """Coupled sampling (the default): with a seed, the tokens are plain decoding's, whatever
    part drafts and whatever weights the learner holds."""
    target = tiny_model()
    params = SamplingParams(max_tokens=32, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)
    plain = [o.token_ids for o in LLM.from_model(target, tokenizer, max_batch_size=4).generate(PROMPTS, params)]
    llm = adaptive_llm(target, tokenizer)
    try:
        run_until_swapped(llm, PROMPTS, params, plain, swaps=1)
    finally:
        llm.close()


def test_every_part_drafts_are_recorded(tokenizer):
    target = tiny_model()
    llm = adaptive_llm(target, tokenizer)
    try:
        outs = llm.generate(PROMPTS * 2, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
        report = llm.engine.proposer.report()
    finally:
        llm.close()
    drafted = sum(sum(o.stats.get("drafted_by", {}).values()) for o in outs)
    assert drafted == sum(report[f"{p}_drafts"] for p in ("static", "suffix", "learner")) > 0
    assert {"learner_steps", "learner_loss", "learner_buffer_tokens", "swaps"} <= set(report)


# --- the learner --------------------------------------------------------------------------


def filled_buffer(target, texts, tokenizer, layers, max_len=64) -> ReplayBuffer:
    buffer = ReplayBuffer(100_000, max_len)
    for text in texts:
        ids = tokenizer.encode(text)
        with torch.inference_mode():
            out = target(torch.tensor([ids]), torch.arange(len(ids))[None], target.new_cache(1, len(ids) + 1),
                         hidden_layers=layers)
        feats = torch.cat([out.hidden[i][0] for i in layers], dim=-1)[:-1]  # the last token never ran
        buffer.add(ids, feats, 4)
    return buffer


def tiny_head_and_traffic(tokenizer, texts):
    """A tiny target, a new head for it, the layers the head learns from, and a buffer of `texts`."""
    target = tiny_model()
    head = new_head(target)
    layers = sorted(set(head.config.resolved_layers(2)) | {1})
    return target, head, layers, filled_buffer(target, texts, tokenizer, layers)


def test_learner_loss_falls_and_first_token_accuracy_rises_on_a_repetitive_stream(tokenizer):
    target = tiny_model()
    # the target's own greedy continuations of a few prompts, seen again and again
    texts = [o.text for o in LLM.from_model(target, tokenizer, max_batch_size=4).generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True))]
    texts = [p + t for p, t in zip(PROMPTS, texts)]
    head = new_head(target)
    layers = sorted(set(head.config.resolved_layers(2)) | {1})
    buffer = filled_buffer(target, texts, tokenizer, layers)
    learner = OnlineLearner(head, target, layers, buffer, LearnerSettings(batch_size=4, lr=3e-3, swap_every=1000))
    probe = buffer.sample(4, random.Random(1))
    with torch.no_grad():
        loss0, m0 = learner.objective(probe)
    for _ in range(60):
        learner.train_step()
    with torch.no_grad():
        loss1, m1 = learner.objective(probe)
    assert float(loss1) < 0.8 * float(loss0)
    assert m1["acc0"] > m0["acc0"] + 0.2


def test_micro_batches_add_up_to_the_whole_batch_gradient(tokenizer):
    # learning only while idle, a step runs one window at a time (shorter ops: an arriving
    # request waits less for the next safe point); the gradient must be the whole batch's
    target = tiny_model()
    head = new_head(target)
    layers = sorted(set(head.config.resolved_layers(2)) | {1})
    n = 20  # windows of one length and one prompt length weigh the same in the whole-batch mean
    texts = [tokenizer.decode(tokenizer.encode(t * 8)[:n]) for t in ("hello world ", "the cat sat on the mat ")]
    buffer = filled_buffer(target, texts, tokenizer, layers)
    assert {it.feats.shape[0] for it in buffer.items} == {len(tokenizer.encode(texts[0])) - 1}
    grads = {}
    for micro in (1, 2):
        learner = OnlineLearner(head, target, layers, buffer, LearnerSettings(
            train_share=0.0, batch_size=2, micro_batch=micro, grad_clip=1e9, swap_every=1000))
        learner._update = lambda micro=micro, learner=learner: grads.__setitem__(
            micro, [p.grad.clone() for p in learner.params])  # the gradient the update would apply
        assert learner.train_step() is not None
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(grads[1], grads[2]))
    assert any(g.abs().sum() > 0 for g in grads[1])


def test_a_batch_splits_into_trimmed_parts():
    windows = [(torch.arange(4), torch.ones(3, 2), 1), (torch.arange(9), torch.ones(8, 2), 2),
               (torch.arange(6), torch.ones(5, 2), 0)]
    batch = Batch.of_windows(windows)
    parts = batch.split(2)
    assert [p.ids.shape for p in parts] == [(2, 9), (1, 6)] and [p.feats.shape for p in parts] == [(2, 8, 2), (1, 5, 2)]
    assert parts[1].lengths.tolist() == [5] and parts[1].prompt_lens.tolist() == [0]
    assert torch.equal(parts[0].ids, batch.ids[:2]) and torch.equal(parts[1].ids, batch.ids[2:, :6])


def test_a_failing_learner_is_switched_off_and_serving_goes_on(tokenizer, monkeypatch, caplog):
    target = tiny_model()
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    plain = [o.token_ids for o in LLM.from_model(target, tokenizer, max_batch_size=4).generate(PROMPTS, params)]
    llm = adaptive_llm(target, tokenizer)
    learner = llm.engine.proposer.learner

    def out_of_memory():
        raise MemoryError("no room for the optimizer state")

    monkeypatch.setattr(learner, "train_step", out_of_memory)
    try:
        for _ in range(20):
            assert [o.token_ids for o in llm.generate(PROMPTS, params)] == plain
            if learner.error:
                break
            time.sleep(0.1)
        assert learner.error and "MemoryError" in learner.error
        assert [o.token_ids for o in llm.generate(PROMPTS, params)] == plain
        assert "learner" not in llm.engine.proposer._eligible_parts()
    finally:
        llm.close()


# --- the controller -----------------------------------------------------------------------


def test_arbiter_prefers_the_higher_measured_acceptance_and_falls_back_after_a_drop():
    arb = Arbiter(["static", "learner", "suffix"])
    for _ in range(5):
        arb.observe_pass(0.1)
    for p, c in (("static", 0.02), ("learner", 0.02), ("suffix", 0.0001)):
        arb.observe_cost(p, c)
    for _ in range(40):
        arb.step()
        arb.observe("r", "static", 1.0)
        arb.observe("r", "learner", 3.0)
    assert arb.choose("r", ["static", "learner"]) == "learner"
    for _ in range(40):  # the traffic changed: the learned head's drafts stop being accepted
        arb.step()
        arb.observe("r", "learner", 0.0)
        arb.observe("r", "static", 1.0)
    assert arb.choose("r", ["static", "learner"]) == "static"
    assert arb.choose("r", []) is None
    for _ in range(100):  # nothing accepts: plain decoding pays more than any draft
        arb.observe("r", "static", 0.0)
    assert arb.choose("r", ["static"]) is None


def test_arbiter_tells_a_lookup_parts_strong_match_from_its_weak_one_by_its_score():
    arb = Arbiter(["learner", "suffix"])
    for _ in range(5):
        arb.observe_pass(0.1)
    arb.observe_cost("learner", 0.02)
    arb.observe_cost("suffix", 0.0001)
    for _ in range(60):  # long matches are accepted, short ones not; the head accepts one token
        arb.step()
        arb.observe("r", "suffix", 4.0, score=5.0)
        arb.observe("r", "suffix", 0.0, score=0.6)
        arb.observe("r", "learner", 1.0)
    # one mean over both (2.0) would pick the suffix cache for either proposal
    assert arb.choose("r", ["learner", "suffix"], {"suffix": 5.0}) == "suffix"
    assert arb.choose("r", ["learner", "suffix"], {"suffix": 0.6}) == "learner"
    # a band never observed starts from the score itself
    assert arb.expected("r", "suffix", 2.5) == pytest.approx(2.5)
    resumed = Arbiter(["learner", "suffix"])
    resumed.load_state(json.loads(json.dumps(arb.state())))
    assert resumed.expected("r", "suffix", 0.6) == pytest.approx(arb.expected("r", "suffix", 0.6))


def test_a_heads_shadow_scores_are_scaled_by_what_it_accepted_when_it_drafted():
    arb = Arbiter(["learner", "suffix"])
    assert arb.calibration("learner") == 1.0  # nothing measured yet: predictions count as they are
    for _ in range(30):  # it predicts 1.0 tokens from its accuracy, and got 0.5 when it drafted
        arb.step()
        arb.observe_prediction("r", "learner", 1.0)
        arb.observe("r", "learner", 0.5)
    assert arb.calibration("learner") == pytest.approx(0.5, rel=0.05)
    for _ in range(200):  # not drafting any more: its shadow scores alone, scaled
        arb.step()
        arb.observe_prediction("r", "learner", 1.0)
    assert arb.window_tokens("learner") == pytest.approx(0.5, abs=0.05)
    assert arb.shadowed["learner"] == 230


def test_matched_length_of_chains_and_trees():
    assert matched_length([5, 6, 7], None, [5, 6, 9, 1]) == 2
    assert matched_length([5, 6, 7], None, [4]) == 0
    # tree: 5 -> (6, 8 -> 9)
    assert matched_length([5, 6, 8, 9], [-1, 0, 0, 2], [5, 8, 9, 3]) == 3
    assert matched_length([5, 6, 8, 9], [-1, 0, 0, 2], [5, 7]) == 1


# --- state --------------------------------------------------------------------------------


def test_state_is_saved_on_close_and_resumed(tokenizer, tmp_path):
    target = tiny_model()
    state = tmp_path / "state"
    llm = adaptive_llm(target, tokenizer, adaptive_state=str(state))
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = [o.token_ids for o in LLM.from_model(target, tokenizer, max_batch_size=4).generate(PROMPTS, params)]
    run_until_swapped(llm, PROMPTS, params, plain, swaps=1)
    llm.close()
    learner = llm.engine.proposer.learner
    saved = json.loads((state / "state.json").read_text())
    assert saved["learner"]["steps"] == learner.steps > 0
    trained = learner.snapshot().fc.weight.detach()

    again = adaptive_llm(target, tokenizer, adaptive_state=str(state))
    try:
        resumed = again.engine.proposer
        assert resumed.learner.steps == learner.steps
        assert torch.allclose(resumed.learner.head.fc.weight.detach(), trained, atol=1e-2)  # stored in bf16
        assert resumed.arbiter.window["learner"].weight == pytest.approx(saved["arbiter"]["window"]["learner"][1])
        assert [o.token_ids for o in again.generate(PROMPTS, params)] == plain
    finally:
        again.close()


NEVER_TRAINS = {**FAST_LEARNER, "min_tokens": 10**9}  # a CLI call's case: no training step before exit


def stored_ids(proposer) -> list[list[int]]:
    return [it.ids.tolist() for it in proposer.learner.buffer.snapshot()]


def test_traffic_and_arbiter_are_kept_without_a_training_step(tokenizer, tmp_path):
    target = tiny_model()
    state = tmp_path / "state"
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = [o.token_ids for o in LLM.from_model(target, tokenizer, max_batch_size=4).generate(PROMPTS, params)]
    llm = adaptive_llm(target, tokenizer, adaptive_state=str(state), learner=NEVER_TRAINS)
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == plain
    first = llm.engine.proposer
    served, tokens, arbiter = stored_ids(first), first.learner.buffer.tokens, first.arbiter.state()
    llm.close()
    assert first.learner.steps == 0 and len(served) == len(PROMPTS) and tokens > 0
    saved = json.loads((state / "state.json").read_text())
    assert saved["head"] is None and saved["arbiter"] == json.loads(json.dumps(arbiter))
    assert not list(state.glob("head-*")) and (state / "traffic.safetensors").exists()

    again = adaptive_llm(target, tokenizer, adaptive_state=str(state), learner=NEVER_TRAINS)
    try:
        resumed = again.engine.proposer
        assert stored_ids(resumed) == served and resumed.learner.buffer.tokens == tokens
        assert resumed.arbiter.state() == json.loads(json.dumps(arbiter))
        assert [o.token_ids for o in again.generate(PROMPTS, params)] == plain
        assert stored_ids(resumed) == served + [p for p in stored_ids(resumed)[len(served):]]  # new traffic after it
        assert len(stored_ids(resumed)) == 2 * len(PROMPTS)
    finally:
        again.close()


def test_stored_traffic_is_bounded_and_saved_while_serving(tokenizer, tmp_path):
    from draftwise.speculators.adaptive.proposer import SAVE_EVERY_REQUESTS

    target = tiny_model()
    state = tmp_path / "state"
    llm = adaptive_llm(target, tokenizer, adaptive_state=str(state), learner={**NEVER_TRAINS, "buffer_tokens": 64})
    try:
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        for _ in range(SAVE_EVERY_REQUESTS // len(PROMPTS) + 1):
            llm.generate(PROMPTS, params)
        saver = llm.engine.proposer._saver
        assert saver is not None  # saved while serving, before any exit
        saver.join(10)
        from safetensors.torch import load_file
        stored = load_file(str(state / "traffic.safetensors"))
        assert 0 < int(stored["lengths"].sum()) <= 64  # the buffer's bound, oldest out
        assert json.loads((state / "state.json").read_text())["head"] is None
    finally:
        llm.close()


def test_a_damaged_traffic_store_is_set_aside_with_one_line(tokenizer, tmp_path, caplog):
    target = tiny_model()
    state = tmp_path / "state"
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    llm = adaptive_llm(target, tokenizer, adaptive_state=str(state), learner=NEVER_TRAINS)
    llm.generate(PROMPTS, params)
    llm.close()
    arbiter = json.loads((state / "state.json").read_text())["arbiter"]
    data = (state / "traffic.safetensors").read_bytes()
    (state / "traffic.safetensors").write_bytes(data[: len(data) // 2])  # cut short
    with caplog.at_level("WARNING", logger="draftwise.adaptive"):
        again = adaptive_llm(target, tokenizer, adaptive_state=str(state), learner=NEVER_TRAINS)
    try:
        warnings = [r for r in caplog.records if "traffic.safetensors" in r.getMessage()]
        assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
        assert "starting with no stored traffic" in warnings[0].getMessage()
        assert again.engine.proposer.learner.buffer.tokens == 0
        assert again.engine.proposer.arbiter.state() == arbiter  # nothing else lost
        assert (state / "traffic.safetensors.damaged").exists()
        again.generate(PROMPTS, params)
    finally:
        again.close()
    assert (state / "traffic.safetensors").exists()  # a fresh store


def test_processes_saving_to_one_state_folder_leave_it_readable(tmp_path, monkeypatch):
    """Ray replicas sharing one learner may share one --adaptive-state folder: whatever the
    interleaving of their saves, state.json names a complete head, and each process removes
    only the heads it wrote."""
    import os

    from draftwise.speculators.adaptive import AdaptiveState

    target = tiny_model()
    states = [AdaptiveState(tmp_path, "tiny"), AdaptiveState(tmp_path, "tiny")]
    pids = [101, 202]  # two processes
    for turn in (0, 1, 0, 0, 1):
        monkeypatch.setattr(os, "getpid", lambda: pids[turn])
        head = new_head(target)
        states[turn].save(head, {}, {"steps": turn})
        saved = json.loads((tmp_path / "state.json").read_text())
        assert saved["head"].endswith(f"-{pids[turn]}")
        loaded = AdaptiveState(tmp_path, "tiny").load_head(target)
        assert torch.allclose(loaded.fc.weight.float(), head.fc.weight.float(), atol=1e-2)
    heads = sorted(p.name for p in tmp_path.glob("head-*"))
    assert len(heads) == 2 and {h.rsplit("-", 1)[1] for h in heads} == {"101", "202"}  # each keeps its newest
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_adaptive_settings_are_refused_with_one_line(tokenizer, tmp_path):
    target = tiny_model()
    with pytest.raises(BadInput, match="adaptive: static: unknown speculator 'nope'"):
        adaptive_llm(target, tokenizer, static={"method": "nope"})
    with pytest.raises(BadInput, match="cannot be the static part"):
        adaptive_llm(target, tokenizer, static={"method": "adaptive"})
    other = tiny_model(hidden_size=32, intermediate_size=64, head_dim=8)
    save_eagle_head(new_head(other), tmp_path / "other-head")
    with pytest.raises(BadInput, match="hidden size|features"):
        adaptive_llm(target, tokenizer, learner={"init": str(tmp_path / "other-head")})
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(BadInput, match="cannot write there"):
        adaptive_llm(target, tokenizer, adaptive_state=str(blocker / "state"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "state.json").write_text("{not json")
    with pytest.raises(BadInput, match="state.json is damaged"):
        adaptive_llm(target, tokenizer, adaptive_state=str(broken))


def test_adaptive_without_learner_uses_static_and_suffix(tokenizer):
    target = tiny_model()
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    plain = [o.token_ids for o in LLM.from_model(target, tokenizer, max_batch_size=4).generate(PROMPTS, params)]
    llm = adaptive_llm(target, tokenizer, learner={"enabled": False})
    assert set(llm.engine.proposer.parts) == {"static", "suffix"}
    assert isinstance(llm.engine.proposer, AdaptiveProposer) and llm.engine.proposer.learner is None
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == plain


def test_train_share_zero_trains_only_while_the_engine_is_idle(tokenizer):
    target, head, layers, buffer = tiny_head_and_traffic(tokenizer, ["hello world " * 8])
    busy = OnlineLearner(head, target, layers, buffer, LearnerSettings(train_share=0.0, train_every=1, min_tokens=4,
                                                                        idle_after=0.3))
    busy.start()
    try:
        for _ in range(40):  # the engine steps every 10 ms: no training step
            busy.tick()
            time.sleep(0.01)
        assert busy.steps == 0
        deadline = time.monotonic() + 20
        while busy.steps == 0 and time.monotonic() < deadline:  # idle: it trains
            time.sleep(0.1)
        assert busy.steps > 0
    finally:
        busy.stop()


def test_pause_holds_training_and_gives_the_engine_thread_its_cores_back(tokenizer):
    # the bench runs every method's engine on one thread: plain must not inherit adaptive's share
    target = tiny_model()
    llm = adaptive_llm(target, tokenizer)
    proposer, learner = llm.engine.proposer, llm.engine.proposer.learner
    torch.set_num_threads(2)
    try:
        llm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        learner.busy = True  # as while a training step runs: the engine's thread keeps one core
        proposer._share_cores()
        assert torch.get_num_threads() == 1
        learner.busy = False
        llm.pause_background()
        assert torch.get_num_threads() == 2 and learner.paused
        steps = learner.steps
        learner.tick()
        time.sleep(1.5)  # longer than idle_after: a running learner would have trained
        assert learner.steps == steps
        llm.resume_background()
        assert not learner.paused
        deadline = time.monotonic() + 20
        while learner.steps == steps and time.monotonic() < deadline:
            time.sleep(0.05)
        assert learner.steps > steps
    finally:
        llm.close()
        torch.set_num_threads(1)


def test_pause_waits_for_a_save_in_flight(tokenizer, tmp_path, monkeypatch):
    # a save (every 8 requests, in a thread of its own) must not run on another method's clock
    llm = adaptive_llm(tiny_model(), tokenizer, adaptive_state=str(tmp_path / "state"))
    proposer = llm.engine.proposer
    save = proposer._save
    monkeypatch.setattr(proposer, "_save", lambda: (time.sleep(0.5), save()))
    try:
        proposer._save_in_background()
        assert proposer._saver.is_alive()
        llm.pause_background()
        assert not proposer._saver.is_alive() and (tmp_path / "state" / "state.json").exists()
    finally:
        llm.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority is a Linux feature")
def test_the_trainer_runs_at_the_lowest_priority_and_an_idle_only_engine_keeps_its_cores(tokenizer):
    # a request arriving mid-step on the 1.5B waited up to 651 ms more for its first token at normal priority
    target = tiny_model()
    llm = adaptive_llm(target, tokenizer, learner={**FAST_LEARNER, "train_share": 0.0})
    proposer, learner = llm.engine.proposer, llm.engine.proposer.learner
    torch.set_num_threads(2)
    try:
        deadline = time.monotonic() + 10
        while not learner.low_priority and time.monotonic() < deadline:
            time.sleep(0.01)
        assert learner.low_priority
        tid = learner._thread.native_id
        assert os.getpriority(os.PRIO_PROCESS, tid) == 19
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < 19  # the engine's thread is untouched
        llm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        learner.busy = True  # a step in flight: idle-only learning leaves the engine every core
        proposer._share_cores()
        assert torch.get_num_threads() == 2
        learner.settings.train_share = 0.5  # learning beside requests: the engine cedes the trainer's core
        proposer._share_cores()
        assert torch.get_num_threads() == 1
        learner.busy = False
    finally:
        llm.close()
        torch.set_num_threads(1)


def test_shared_learning_two_engines_feed_one_learner_and_both_adopt_its_weights(tokenizer):
    """The Ray replicas' protocol (server/ray_serve.py, ray_learner.py) without Ray, through
    the Proposer hooks: two engines `share`; one learner, built from the spec `share`
    returned, trains on what both `take_shared`; both `adopt` its answer (weights included)
    and the other's sequences, swap the weights in and stay identical to plain decoding."""
    from draftwise.speculators.adaptive import Stored

    target = tiny_model()
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = [o.token_ids for o in LLM.from_model(target, tokenizer, max_batch_size=4).generate(PROMPTS, params)]
    engines = [adaptive_llm(target, tokenizer) for _ in range(2)]
    try:
        proposers = [e.engine.proposer for e in engines]
        learners = [p.learner for p in proposers]
        sharing = [p.share() for p in proposers]
        for ln, sh in zip(learners, sharing):
            assert ln._thread is None and ln.shared
            assert sh.sequences and sh.learner["steps"] == 0 and sh.learner["data_layers"] == ln.data_layers
        served = []
        for e, (a, b) in zip(engines, ((0, 2), (2, 4))):  # each engine serves half of the traffic
            served.append(e.generate(PROMPTS[a:b], params))
            assert [o.token_ids for o in served[-1]] == plain[a:b]
        assert all(ln.steps == 0 and ln.buffer.tokens == 0 for ln in learners)  # nothing trained locally
        shared = OnlineLearner.from_spec(sharing[0].learner, target, min_tokens=16, batch_size=2, lr=1e-3)
        assert shared.buffer.max_tokens == learners[0].buffer.max_tokens
        learned = [p.take_shared() for p in proposers]
        for got, outs in zip(learned, served):
            assert sorted(got.sequences) == sorted(o.prompt_token_ids + o.token_ids for o in outs)
            assert len(got.examples) == 2  # each request's tokens the target ran, with their features
            assert all(ids.tolist() in [seq[: len(ids)] for seq in got.sequences] for ids, _, _ in got.examples)
            for ids, feats, prompt_len in got.examples:
                shared.buffer.put(Stored(ids, feats, prompt_len))
        assert all(p.take_shared() == type(learned[0])() for p in proposers)  # taken once
        for _ in range(6):
            assert shared.train_step() is not None
        state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                 for k, v in shared.snapshot().state_dict().items()}
        answer = {"error": None, "steps": shared.steps, "loss": shared.last_loss,
                  "buffer_tokens": shared.buffer.tokens, "state": state, "version": 1}
        for i, (e, ln) in enumerate(zip(engines, learners)):
            e.engine.proposer.adopt(sequences=learned[1 - i].sequences, learner=answer)
            assert e.engine.proposer.parts["suffix"].inbox.qsize() == 2
            assert [o.token_ids for o in e.generate(PROMPTS, params)] == plain
            assert e.engine.proposer.swaps == 1 and ln.steps == 6
            assert e.engine.proposer.report()["learner_buffer_tokens"] == shared.buffer.tokens > 0
            got = ln.snapshot().state_dict()
            assert all(torch.equal(got[k], v.to(got[k].dtype)) for k, v in state.items())
    finally:
        for e in engines:
            e.close()


def test_a_request_arriving_mid_step_stops_the_idle_time_step_unapplied(tokenizer):
    # a request arriving mid-step on the 1.5B waited up to 248 ms more for its first token
    target, head, layers, buffer = tiny_head_and_traffic(tokenizer, ["hello world " * 8])
    learner = OnlineLearner(head, target, layers, buffer, LearnerSettings(train_share=0.0, min_tokens=4, batch_size=2))
    objective = learner.objective
    before = {k: v.clone() for k, v in learner.head.state_dict().items()}

    def arrives_in_forward(batch):
        learner.interrupt()  # as the engine's add_request does
        return objective(batch)

    def arrives_in_backward(batch):
        loss, extra = objective(batch)
        loss.register_hook(lambda g: learner.interrupt())  # the first thing backward runs
        return loss, extra

    for arrival in (arrives_in_forward, arrives_in_backward):
        learner._interrupt.clear()  # what the trainer thread does before each step
        learner.objective = arrival
        assert learner.train_step() is None
        assert all(torch.equal(before[k], v) for k, v in learner.head.state_dict().items()), arrival.__name__
        assert all(p.grad is None for p in learner.params)
    assert learner.interrupted == 2 and learner.steps == 0
    learner.objective = objective
    learner._interrupt.clear()
    assert learner.train_step() is not None and learner.steps == 1  # the next idle step trains
    assert learner.snapshot()._forward_pre_hooks == {}  # drafting copies carry no safe points
    learner.settings.train_share = 0.5  # learning beside requests: arrivals do not stop steps
    learner.interrupt()
    assert not learner._interrupt.is_set()


def test_the_objectives_lm_head_parts_run_in_pieces_with_safe_points_and_the_same_loss(tokenizer):
    # the labels and each unrolled step's logits, with their backward, were the longest
    # stretches without a safe point on the 1.5B (450-660 ms, one thread)
    from draftwise.speculators.eagle import EagleObjective

    target, head, layers, buffer = tiny_head_and_traffic(tokenizer, ["hello world " * 8, "the cat sat on the mat " * 4])
    head.float()
    batch = buffer.sample(2, random.Random(0))
    calls = []
    whole = EagleObjective(head, target, layers, 2)
    pieces = EagleObjective(head, target, layers, 2, between=lambda: calls.append(torch.is_grad_enabled()),
                            piece_rows=5)
    grads = []
    for objective in (whole, pieces):
        head.zero_grad()
        loss, metrics = objective(batch)
        forward_calls = len(calls)
        loss.backward()
        grads.append(({k: p.grad.clone() for k, p in head.named_parameters() if p.grad is not None}, loss, metrics))
    (g1, l1, m1), (g2, l2, m2) = grads
    torch.testing.assert_close(l1, l2)
    assert m1 == pytest.approx(m2, rel=1e-4)
    assert g1.keys() == g2.keys() and g1
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], msg=k)
    rows = int(batch.lengths.sum())
    assert forward_calls > rows // 5  # the labels alone come in that many pieces
    assert len(calls) > forward_calls + 2  # and backward stops between pieces too
    assert not any(calls[forward_calls:])  # backward's safe points run in backward (grad mode off)


def test_an_update_cut_short_by_an_arrival_is_finished_first_and_equals_the_whole_one(tokenizer):
    # the update of the head's parameters stops between two when a request arrives (on the
    # 1.5B it took 130 ms at once); the next idle call finishes it before a new batch
    target, head, layers, buffer = tiny_head_and_traffic(tokenizer, ["hello world " * 8, "the cat sat on the mat " * 4])
    settings = LearnerSettings(train_share=0.0, min_tokens=4, batch_size=2, swap_every=2)
    whole = OnlineLearner(head, target, layers, buffer, settings)
    cut = OnlineLearner(head, target, layers, buffer, settings)
    for _ in range(2):
        assert whole.train_step() is not None
    assert whole.swaps_made == 1 and whole.steps == 2
    third = cut.opts[len(cut.opts) // 3]
    real_step = third.step

    def arrives(*a, **k):
        cut.interrupt()  # as the engine's add_request does, in the middle of the update
        return real_step(*a, **k)

    third.step = arrives
    before = {k: v.clone() for k, v in cut.head.state_dict().items()}
    assert cut.train_step() is None and cut.steps == 0 and cut.interrupted == 1
    changed = [k for k, v in cut.head.state_dict().items() if not torch.equal(before[k], v)]
    assert changed and len(changed) < len(before)  # stopped part-way through the parameters
    third.step = real_step
    cut._interrupt.clear()  # idle again
    cut_copy = []
    real_copy = cut._make_copy

    def copy_cut_once():
        if not cut_copy:
            cut_copy.append(1)
            cut.interrupt()
        real_copy()

    cut._make_copy = copy_cut_once
    # the rest of that update first, then a new step, whose drafting copy (swap_every 2) is cut short
    assert cut.train_step() is None and cut.steps == 2 and cut._copy_due and cut.ready is None
    assert all(p.grad is None for p in cut.params)
    cut._interrupt.clear()
    assert cut.train_step() is not None and cut.ready is not None and cut.swaps_made == 1 and cut.steps == 3
    # the interrupted steps applied the same update as the uninterrupted ones
    w2 = {k: v.clone() for k, v in whole.head.state_dict().items()}
    assert whole.train_step() is not None
    for k, v in whole.head.state_dict().items():
        torch.testing.assert_close(cut.head.state_dict()[k], v, msg=k)
    assert any(not torch.equal(w2[k], v) for k, v in whole.head.state_dict().items())


def test_the_engine_takes_a_drafting_copy_without_waiting_for_the_step_in_flight(tokenizer):
    # the engine takes a new copy at every step; the trainer holds the head's lock through a
    # forward and backward, and a request that arrived mid-step waited there on the 1.5B
    target, head, layers, buffer = tiny_head_and_traffic(tokenizer, ["hello world " * 8])
    learner = OnlineLearner(head, target, layers, buffer, LearnerSettings(train_share=0.0, min_tokens=4, batch_size=2,
                                                                          swap_every=1))
    assert learner.train_step() is not None and learner.ready is not None  # a copy waits
    objective, inside, taken = learner.objective, threading.Event(), threading.Event()

    def slow(batch):  # a long op of the next step, in the trainer's thread
        inside.set()
        taken.wait(10.0)
        return objective(batch)

    learner.objective = slow
    trainer = threading.Thread(target=learner.train_step)
    trainer.start()
    try:
        assert inside.wait(10.0)
        start = time.perf_counter()
        fresh = learner.take_ready()
        waited = time.perf_counter() - start
    finally:
        taken.set()
        trainer.join()
    assert fresh is not None and waited < 1.0
    assert learner.steps == 2


def wait_for(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_a_request_waiting_for_its_prefill_is_not_idle_time(tokenizer):
    # the 1.5B prefills a 330-token prompt in 1.2 s, longer than idle_after, and no step ends
    # meanwhile: an idle-time step started then ran through the request's decoding
    llm = adaptive_llm(tiny_model(), tokenizer, learner={**FAST_LEARNER, "train_share": 0.0})
    learner = llm.engine.proposer.learner
    try:
        llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
        assert wait_for(lambda: learner.steps > 0)  # the last request finished: idle, it trains
        req = llm.engine.add_request(tokenizer.encode(PROMPTS[0]), SamplingParams(temperature=0.0, max_tokens=2))
        assert wait_for(lambda: not learner.busy)  # the step in flight, if any, stops at a safe point
        steps = learner.steps
        time.sleep(1.6)  # longer than idle_after, and no engine step: the request still waits
        assert learner.steps == steps and not learner.busy
        llm.engine.abort(req.request_id)  # the engine holds nothing again: idle time
        assert wait_for(lambda: learner.steps > steps)
    finally:
        llm.close()


def test_the_engine_tells_an_idle_only_learner_of_each_arrival(tokenizer):
    llm = adaptive_llm(tiny_model(), tokenizer, learner={**FAST_LEARNER, "train_share": 0.0})
    learner = llm.engine.proposer.learner
    try:
        learner._interrupt.clear()
        llm.engine.add_request(tokenizer.encode(PROMPTS[0]), SamplingParams(temperature=0.0, max_tokens=2))
        assert learner._interrupt.is_set()
        llm.engine.run_until_done()
    finally:
        llm.close()
