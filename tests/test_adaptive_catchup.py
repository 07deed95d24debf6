"""An adaptive state's offline side: `draftwise train adaptive --state DIR` (train/adaptive.py)
trains its head on the traffic it stored, the next process serves that head; `draftwise
stats --state DIR` shows what it learned; the commands' refusals."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model
from draftwise.api import LLM
from draftwise.sampling import SamplingParams
from draftwise.speculators.eagle import save_eagle_head
from draftwise.train.adaptive import train_adaptive

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["hello world hello world", "the cat sat on the mat", "abcabcabcabc", "def f(x): return x"]
# serving that never trains (a CLI call's case), then the catch-up's own loop
SERVING = {"min_tokens": 10**9, "train_every": 1, "batch_size": 2, "max_len": 64}
CATCH_UP = {"min_tokens": 16, "train_share": 0.0, "train_when_idle": False, "batch_size": 4, "max_len": 64,
            "lr": 3e-3}
PARAMS = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def adaptive(target, tokenizer, state, learner) -> LLM:
    spec = {"method": "adaptive", "num_speculative_tokens": 6, "adaptive_state": str(state), "learner": learner}
    return LLM.from_model(target, tokenizer, speculative_config=spec, max_batch_size=4)


def mean_accepted(target, tokenizer, head_folder) -> tuple[float, list[list[int]]]:
    llm = LLM.from_model(target, tokenizer, max_batch_size=4, speculative_config={
        "method": "eagle", "model": str(head_folder), "num_speculative_tokens": 4, "adaptive": False})
    outs = llm.generate(PROMPTS, PARAMS)
    return sum(len(o.token_ids) for o in outs) / sum(o.stats["target_passes"] for o in outs), [o.token_ids for o in outs]


def test_offline_training_improves_acceptance_and_the_next_process_serves_it(tokenizer, tmp_path):
    target = tiny_model()
    state = tmp_path / "state"
    plain = [o.token_ids for o in LLM.from_model(target, tokenizer, max_batch_size=4).generate(PROMPTS, PARAMS)]
    serving = adaptive(target, tokenizer, state, SERVING)
    for _ in range(3):
        assert [o.token_ids for o in serving.generate(PROMPTS, PARAMS)] == plain
    save_eagle_head(serving.engine.proposer.learner.snapshot(), tmp_path / "before")
    serving.close()
    assert json.loads((state / "state.json").read_text())["head"] is None  # no step while serving

    catching = adaptive(target, tokenizer, state, CATCH_UP)
    try:
        result = train_adaptive(catching.engine.proposer, max_steps=120, max_minutes=None, progress=False)
    finally:
        catching.close()
    assert result.steps == result.total_steps == 120 and result.stopped_by == "steps"
    assert result.last_loss < result.first_loss
    saved = json.loads((state / "state.json").read_text())
    assert saved["head"] and saved["learner"]["steps"] == 120
    trained = catching.engine.proposer.learner.snapshot()

    before, before_out = mean_accepted(target, tokenizer, tmp_path / "before")
    after, after_out = mean_accepted(target, tokenizer, state / saved["head"])
    assert before_out == after_out == plain
    assert after > before + 0.3, (before, after)

    nxt = adaptive(target, tokenizer, state, SERVING)
    try:
        resumed = nxt.engine.proposer.learner.head  # the head the learner part drafts with, as loaded
        assert torch.allclose(resumed.fc.weight.float(), trained.fc.weight.float(), atol=1e-2)  # bf16 on disk
        assert nxt.engine.proposer.learner.steps == 120
        assert [o.token_ids for o in nxt.generate(PROMPTS, PARAMS)] == plain
    finally:
        nxt.close()


def test_train_adaptive_command(tokenizer, tmp_path, monkeypatch, capsys):
    import draftwise.api
    from draftwise.cli import main

    target = tiny_model()
    made = []

    def llm(model, **kw):  # the command loads the state's target by name; here the tiny model
        made.append(model)
        return LLM.from_model(target, tokenizer, speculative_config=kw["speculative_config"], max_batch_size=4)

    monkeypatch.setattr(draftwise.api, "LLM", llm)
    state = tmp_path / "state"
    assert main(["train", "adaptive", "--state", str(state)]) == 2
    assert "no adaptive state there" in capsys.readouterr().err

    empty = adaptive(target, tokenizer, state, SERVING)
    empty.close()  # a state with no traffic yet
    assert main(["train", "adaptive", "--state", str(state), "--quiet"]) == 0
    assert "less than one training batch" in capsys.readouterr().out

    serving = adaptive(target, tokenizer, state, SERVING)
    serving.generate(PROMPTS, PARAMS)
    serving.close()
    made.clear()
    assert main(["train", "adaptive", "--state", str(state), "--target", "another-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was learned on the target, not another-model" in err and not made

    assert main(["train", "adaptive", "--state", str(state), "--max-steps", "5", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert made == ["the target"] and report["steps"] == 5 and report["total_steps"] == 5
    assert main(["train", "adaptive", "--state", str(state), "--max-steps", "3", "--quiet"]) == 0  # resumes
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["total_steps"] == 8
    assert main(["train", "eagle", "--target", "x"]) == 2
    assert "needs --data, --out" in capsys.readouterr().err


def test_stats_shows_what_a_state_learned(tokenizer, tmp_path, capsys):
    from draftwise.cli import main

    target = tiny_model()
    state = tmp_path / "state"
    serving = adaptive(target, tokenizer, state, SERVING)
    for _ in range(2):
        serving.generate(PROMPTS, PARAMS)
    buffered = serving.engine.proposer.learner.buffer.tokens
    serving.close()
    assert main(["stats", "--state", str(state), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["target"] == "the target" and first["head"] is None
    assert first["learned_from"]["requests"] == 2 * len(PROMPTS) and first["learned_from"]["tokens"] >= buffered > 0
    assert first["stored_traffic"]["tokens"] == buffered and first["stored_traffic"]["sequences"] == 2 * len(PROMPTS)
    assert first["training"] == {"steps": 0, "first_loss": None, "last_loss": None}
    assert set(first["acceptance"]["now"]) == {"static", "learner", "suffix"}

    catching = adaptive(target, tokenizer, state, CATCH_UP)
    try:
        train_adaptive(catching.engine.proposer, max_steps=5, max_minutes=None, progress=False)
    finally:
        catching.close()
    assert main(["stats", "--state", str(state), "--json"]) == 0
    later = json.loads(capsys.readouterr().out)
    assert later["head"] and later["training"]["steps"] == 5
    assert later["training"]["first_loss"] is not None and later["training"]["last_loss"] is not None
    assert later["acceptance"]["first_save"] == first["acceptance"]["now"]
    assert later["learned_from"] == first["learned_from"]  # training adds no traffic
    assert main(["stats", "--state", str(state)]) == 0
    table = capsys.readouterr().out
    assert f"learned from: {2 * len(PROMPTS)} requests" in table and "training: 5 steps" in table
    assert main(["stats", "--state", str(tmp_path / "none")]) == 2
    assert "no adaptive state there" in capsys.readouterr().err


def test_held_out_traffic_is_never_trained_on_and_its_loss_is_measured(tokenizer):
    import random

    from test_adaptive import tiny_head_and_traffic

    from draftwise.speculators.adaptive.online import LearnerSettings, OnlineLearner
    from draftwise.train.adaptive import split

    texts = [f"item {i}: " + " ".join(str(i * 7 + j) for j in range(12)) for i in range(16)]
    target, head, layers, buffer = tiny_head_and_traffic(tokenizer, texts)
    items = buffer.snapshot()
    trained, held = split(items)
    assert [id(it) for it in held] == [id(items[5]), id(items[15])] and len(trained) == 14
    few = split(items[:4])  # too few to hold any out
    assert few[1] == [] and [id(it) for it in few[0]] == [id(it) for it in items[:4]]
    rng, skip = random.Random(0), frozenset(id(it) for it in held)
    seen = set()
    for _ in range(200):
        batch = buffer.sample(4, rng, skip)
        for row, n in zip(batch.ids, batch.lengths):
            seen.add(tuple(row[: int(n)].tolist()))
    held_rows = {tuple(it.ids.tolist()) for it in held}
    assert seen and not seen & held_rows and len(seen) == len(trained)  # whole sequences: each shorter than max_len

    learner = OnlineLearner(head, target, layers, buffer, LearnerSettings(batch_size=4, lr=3e-3, swap_every=1000))
    before = learner.loss_on(held)
    assert before is not None and before == learner.loss_on(held)  # no training in a measure
    learner.held_out = skip
    fitted = learner.loss_on(trained)
    for _ in range(40):
        learner.train_step()
    assert learner.loss_on(trained) < fitted
    assert learner.loss_on([]) is None


def scripted_catch_up(tokenizer, tmp_path, monkeypatch, losses: list[float], max_steps: int):
    """A catch-up on tiny traffic whose held-out measures read `losses` in turn; returns
    (result, the weights at each measure, the weights served after, the saved head, the learner)."""
    from draftwise.speculators.eagle import load_eagle_head

    target = tiny_model()
    state = tmp_path / "state"
    serving = adaptive(target, tokenizer, state, SERVING)
    serving.generate(PROMPTS + [p[::-1] for p in PROMPTS], PARAMS)  # 8 sequences: one held out
    serving.close()
    catching = adaptive(target, tokenizer, state, CATCH_UP)
    learner = catching.engine.proposer.learner
    measures, at = iter(losses), []

    def measured(items):
        assert len(items) == 1
        at.append(learner.weights())
        return next(measures)

    monkeypatch.setattr(learner, "loss_on", measured)
    try:
        result = train_adaptive(catching.engine.proposer, max_steps=max_steps, max_minutes=None, progress=False)
    finally:
        catching.close()
    saved = load_eagle_head(state / json.loads((state / "state.json").read_text())["head"], target)
    return result, at, learner.weights(), saved, learner


def test_catch_up_stops_when_the_held_out_loss_stops_falling_and_keeps_the_best_head(tokenizer, tmp_path,
                                                                                  monkeypatch):
    from draftwise.train import adaptive as catch_up

    # the held-out loss as measured: falls for two measures, then rises
    result, at, served, saved, learner = scripted_catch_up(tokenizer, tmp_path, monkeypatch,
                                                           [5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 3.8, 3.9], 1000)
    assert result.stopped_by == "held-out" and result.held_out == 1
    assert result.steps == catch_up.EVAL_EVERY * (2 + catch_up.PATIENCE)  # the best at the second measure
    assert (result.held_out_first, result.held_out_best) == (5.0, 3.0)
    best, last = at[2], at[-1]
    assert any(not torch.equal(best[k], last[k]) for k in best)  # training went on past the best
    assert all(torch.equal(best[k], served[k]) for k in best) and not learner.held_out
    assert torch.allclose(saved.fc.weight.float(), best["fc.weight"].float(), atol=1e-2)


def test_the_best_head_is_saved_when_the_step_budget_ends_on_a_save(tokenizer, tmp_path, monkeypatch):
    # best at the first measure (step 25); the budget ends at step 100, just after a periodic save
    result, at, served, saved, _ = scripted_catch_up(tokenizer, tmp_path, monkeypatch, [5.0, 3.0, 4.0, 4.0, 4.0], 100)
    assert result.stopped_by == "steps" and result.steps == 100 and result.held_out_best == 3.0
    best = at[1]
    assert all(torch.equal(best[k], served[k]) for k in best)
    assert not torch.allclose(at[-1]["fc.weight"].float(), best["fc.weight"].float(), atol=1e-2)
    assert torch.allclose(saved.fc.weight.float(), best["fc.weight"].float(), atol=1e-2)
