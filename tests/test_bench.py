"""`draftwise bench` and `draftwise cost`: end to end on a tiny model, resume, arithmetic."""

from __future__ import annotations

import json
import time

import pytest

from conftest import byte_tokenizer, tiny_model
from draftwise.api import LLM
from draftwise.bench import BenchSettings, load_questions, parse_methods, run_bench
from draftwise.bench import cost
from draftwise.bench.dataset import Question
from draftwise.bench.summary import summarize
from draftwise.errors import BadInput

MAX_TOKENS = 24
QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["abcabcabcabc", "say it again: abcabc"]},
    {"question_id": 161, "category": "translation", "turns": ["the cat sat on the mat. the cat sat on the"]},
    {"question_id": 321, "category": "qa", "turns": ["x = 1\nx = 1\nx = 1\n"]},
]
ROW_FIELDS = {"questions", "generations", "output_tokens", "seconds", "tokens_per_second", "speedup",
              "mean_accepted_length", "acceptance_rate", "acceptance_per_position", "target_passes_per_token",
              "draft_time_share", "exact_match", "exact_match_compared"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def small_llm() -> LLM:
    return LLM.from_model(tiny_model(), byte_tokenizer(), max_batch_size=1)


def settings(dataset) -> BenchSettings:
    return BenchSettings(model="tiny", dtype="fp32", max_tokens=MAX_TOKENS, dataset=str(dataset))


def test_bench_end_to_end(tmp_path, dataset):
    out = tmp_path / "out"
    questions = load_questions(dataset)
    data = run_bench(small_llm(), questions, parse_methods(["ngram"]), out, settings(dataset), progress=False)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(data))
    for key in ("date", "machine", "settings", "methods", "categories", "results", "lossless", "notes", "files"):
        assert key in on_disk
    assert {"cpu", "cores", "torch", "dtype", "date"} <= set(on_disk["machine"])
    assert on_disk["categories"] == ["mt_bench", "translation", "qa"]
    assert [m["label"] for m in on_disk["methods"]] == ["plain", "ngram"]
    plain, ngram = on_disk["results"]["plain"], on_disk["results"]["ngram"]
    for res in (plain, ngram):
        assert set(res["overall"]) == ROW_FIELDS
        assert set(res["categories"]) == {"mt_bench", "translation", "qa"}
    assert plain["overall"]["questions"] == 3 and plain["overall"]["generations"] == 4
    assert plain["overall"]["speedup"] == 1.0
    assert plain["overall"]["mean_accepted_length"] == 1.0
    assert plain["overall"]["target_passes_per_token"] == 1.0
    assert ngram["overall"]["exact_match"] == 1.0 and ngram["overall"]["exact_match_compared"] == 4
    assert ngram["overall"]["speedup"] == pytest.approx(
        ngram["overall"]["tokens_per_second"] / plain["overall"]["tokens_per_second"], abs=1e-3)
    assert ngram["overall"]["acceptance_per_position"], "the repetitive prompts must exercise drafting"
    assert ngram["overall"]["mean_accepted_length"] > 1.0
    assert on_disk["lossless"] == {"greedy": True, "ok": True, "mismatches": []}
    md = (out / "results.md").read_text()
    assert "| ngram |" in md and "speedup" in md and "mt_bench" in md
    for png in on_disk["files"]["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(on_disk["files"]["plots"]) == {"speedup.png", "acceptance.png"}
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 8
    two_turn = [r for r in records if r["question_id"] == 81 and r["method"] == "plain"]
    assert [r["turn"] for r in two_turn] == [0, 1]
    assert two_turn[1]["prompt_tokens"] > two_turn[0]["prompt_tokens"] + len(two_turn[0]["token_ids"])


def test_interleaved_run_alternates_methods_question_by_question(tmp_path, dataset):
    questions = load_questions(dataset)
    order = []
    data = run_bench(small_llm(), questions, parse_methods(["ngram"]), tmp_path, settings(dataset), progress=False,
                     plots=False, interleave=True, on_record=lambda r: order.append((r["question_id"], r["method"])))
    assert order == [(81, "plain"), (81, "plain"), (81, "ngram"), (81, "ngram"),
                     (161, "plain"), (161, "ngram"), (321, "plain"), (321, "ngram")]
    assert data["lossless"]["ok"] and data["results"]["ngram"]["overall"]["generations"] == 4


def test_warmup_does_not_see_the_questions(tmp_path, dataset, monkeypatch):
    from draftwise.bench import runner

    prompts = []
    real = runner.draftwise_generate

    def recording(llm):
        generate = real(llm)
        return lambda ids, messages, params: prompts.append(messages[-1]["content"]) or generate(ids, messages, params)

    monkeypatch.setattr(runner, "draftwise_generate", recording)
    questions = load_questions(dataset)
    run_bench(small_llm(), questions, parse_methods(["ngram"]), tmp_path, settings(dataset), progress=False, plots=False)
    warmups = [p for p in prompts if p == runner.WARMUP_MESSAGES[0]["content"]]
    assert len(warmups) == 2 and len(prompts) == 2 + 8  # one warm-up per method, then the 8 measured turns
    assert not {p for p in prompts} - {t for q in questions for t in q.turns} - set(warmups)


def test_interrupted_run_resumes_without_redoing(tmp_path, dataset, monkeypatch):
    out = tmp_path / "out"
    questions = load_questions(dataset)
    methods = parse_methods(["ngram"])

    class Stop(Exception):
        pass

    def stop_after_first(record):
        raise Stop

    llm = small_llm()
    with pytest.raises(Stop):
        run_bench(llm, questions, methods, out, settings(dataset), progress=False, on_record=stop_after_first)
    assert len((out / "records.jsonl").read_text().splitlines()) == 1

    calls = []
    real = type(llm).generate

    def counting(self, prompts, params=None, **kw):  # every method's engine is an LLM on the same target
        calls.append(params.max_tokens)
        return real(self, prompts, params, **kw)

    monkeypatch.setattr(type(llm), "generate", counting)
    with open(out / "records.jsonl", "a") as f:
        f.write('{"question_id": 161, "tu')  # a record cut short by the interruption
    data = run_bench(llm, questions, methods, out, settings(dataset), progress=False, plots=False)
    assert calls.count(MAX_TOKENS) == 8 - 1  # the first (question, turn, method) is not redone
    assert len(calls) == 7 + 2 + 7  # plus one warm-up per method, and the plain probe (a warm-up, 3 at the start, 3 at the end)
    assert len((out / "records.jsonl").read_text().splitlines()) == 8
    assert data["results"]["ngram"]["overall"]["exact_match"] == 1.0

    calls.clear()
    run_bench(llm, questions, methods, out, settings(dataset), progress=False, plots=False)
    assert calls == []
    changed = BenchSettings(model="tiny", dtype="fp32", max_tokens=MAX_TOKENS + 1, dataset=str(dataset))
    with pytest.raises(BadInput, match="other settings"):
        run_bench(llm, questions, methods, out, changed, progress=False)


ADAPTIVE = {"method": "adaptive", "num_speculative_tokens": 4,
            "learner": {"min_tokens": 16, "train_every": 1, "train_share": 1.0, "swap_every": 1, "batch_size": 2,
                        "max_len": 64}}


def test_no_learner_trains_while_another_method_is_timed(tmp_path, dataset, monkeypatch):
    # a learner that trained while plain was timed made adaptive look 1.93x on the 1.5B
    from draftwise.bench import runner
    from draftwise.speculators.adaptive import OnlineLearner

    steps, plain, learners = [], [], []
    real_step, real_run, real_probe = OnlineLearner.train_step, runner.run_method, runner.probe_plain

    def step(self):
        start = time.perf_counter()
        try:
            return real_step(self)
        finally:
            steps.append((start, time.perf_counter()))

    def timed(label, fn):
        def call(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                if label == "plain":
                    plain.append((start, time.perf_counter()))
        return call

    def run_method(llm, generate, method, *args):
        real_run(llm, timed(method.label, generate), method, *args)
        learner = getattr(llm.engine.proposer, "learner", None)
        if learner is not None:  # adaptive's turn: its learner may train, so give it the time to
            learners.append(learner)
            deadline = time.monotonic() + 10
            while learner.buffer.tokens >= 16 and learner.steps < len(learners) and time.monotonic() < deadline:
                time.sleep(0.01)

    monkeypatch.setattr(OnlineLearner, "train_step", step)
    monkeypatch.setattr(runner, "run_method", run_method)
    monkeypatch.setattr(runner, "probe_plain", lambda llm, s: timed("plain", real_probe)(llm, s))
    methods = parse_methods([json.dumps(ADAPTIVE)])
    data = run_bench(small_llm(), load_questions(dataset), methods, tmp_path, settings(dataset), progress=False,
                     plots=False, interleave=True)
    assert learners and learners[-1].steps >= 2 and len(steps) >= 2  # the learner did train, in adaptive's turns
    assert len(plain) == 7 + 3 + 4  # the probe (a warm-up, 3 at the start, 3 at the end), a warm-up per question, 4 turns
    overlaps = [(s, p) for s in steps for p in plain if s[0] < p[1] and p[0] < s[1]]
    assert not overlaps, f"{len(overlaps)} training steps ran while plain was timed"
    assert data["lossless"]["ok"]
    probe = [n for n in data["notes"] if n.startswith("plain probe")]
    assert len(probe) == 1 and "tokens/s at the start" in probe[0]
    assert not learners[-1]._thread or not learners[-1]._thread.is_alive()  # the run closed the engines


def test_probe_drift_is_reported(capsys):
    from draftwise.bench.runner import probe_note

    line, drifted = probe_note(20.0, 19.0)
    assert not drifted and "+" not in line and "-5.0%" in line
    line, drifted = probe_note(20.0, 10.0)
    assert drifted and "-50.0%" in line and "suspect" in line


def test_malformed_dataset_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(QUESTIONS[0]) + "\n" + '{"question_id": 2, "category": "qa", "turns": [\n')
    with pytest.raises(BadInput, match=r"line 2: not valid JSON"):
        load_questions(path)
    path.write_text(json.dumps(QUESTIONS[0]) + "\n\n" + '{"question_id": 3, "category": "qa"}\n')
    with pytest.raises(BadInput, match=r"line 3: missing field\(s\) turns"):
        load_questions(path)


def test_draft_model_without_its_model_is_refused_before_running():
    with pytest.raises(BadInput, match="draft_model needs its draft model"):
        parse_methods(["ngram", "draft_model"])
    assert parse_methods(['{"method": "draft_model", "model": "m"}'])[1].label == "draft_model:m"


def test_categories_and_limit(dataset):
    assert [q.question_id for q in load_questions(dataset, ["mt_bench", "qa"])] == [81, 321]
    assert [q.question_id for q in load_questions(dataset, ["writing"], limit=1)] == [81]
    with pytest.raises(BadInput, match="unknown category"):
        load_questions(dataset, ["poetry"])


def record(qid, method, tokens, seconds, ids, turn=0):
    return {"question_id": qid, "category": "qa", "group": "qa", "turn": turn, "method": method,
            "output_tokens": tokens, "seconds": seconds, "token_ids": ids, "stats": None}


def test_speedup_is_ratio_of_mean_tokens_per_second():
    qs = [Question(1, "qa", ("a",)), Question(2, "qa", ("b",))]
    records = [
        record(1, "plain", 100, 10.0, [1, 2]), record(2, "plain", 100, 5.0, [3]),  # 10 and 20 tokens/s
        record(1, "hf", 100, 2.0, [1, 2]), record(2, "hf", 100, 4.0, [4]),  # 50 and 25 tokens/s
    ]
    out = summarize(records, parse_methods([], ["hf"]), qs)
    plain, hf = out["results"]["plain"]["overall"], out["results"]["hf"]["overall"]
    assert plain["tokens_per_second"] == 15.0 and hf["tokens_per_second"] == 37.5
    assert hf["speedup"] == 2.5
    assert hf["exact_match"] == 0.5
    assert out["mismatches"][0]["question_id"] == 2 and out["mismatches"][0]["first_difference"] == 0


def test_cost_arithmetic_matches_published_numbers():
    assert cost.dollars_per_million_tokens(2.00, 40) == pytest.approx(13.89, abs=0.01)
    assert cost.dollars_per_million_tokens(2.00, 100) == pytest.approx(5.56, abs=0.01)
    assert cost.saving(cost.dollars_per_million_tokens(2.00, 40), cost.dollars_per_million_tokens(2.00, 100)) \
        == pytest.approx(0.60)
    assert cost.compute_cut(0.30) == pytest.approx(3.33, abs=0.01)
    assert cost.speculative_tokens_per_second(40, 2.5) == 100
    # 50M tokens/day: 40 tokens/s = 3.456M a GPU-day -> 15 GPUs; 100 tokens/s -> 6
    assert cost.gpus_needed(100_000, 500, 40) == 15 and cost.gpus_needed(100_000, 500, 100) == 6
    assert cost.gpus_needed(1, 1, 40) == 1
    assert cost.monthly_cost(6, 2.00) == pytest.approx(8760.0)


def test_cost_command(tmp_path, capsys):
    from draftwise.cli import main

    assert main(["cost", "--tokens-per-second", "40", "--speedup", "2.5", "--passes-per-token", "0.3"]) == 0
    text = capsys.readouterr().out
    assert "13.89" in text and "5.56" in text and "60% cheaper per token" in text and "3.3x" in text
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"results": {
        "plain": {"overall": {"tokens_per_second": 40.0, "target_passes_per_token": 1.0}},
        "ngram": {"overall": {"tokens_per_second": 100.0, "target_passes_per_token": 0.3}}}}))
    assert main(["cost", "--results", str(results)]) == 0
    assert "ngram" in capsys.readouterr().out
    assert main(["cost", "--tokens-per-second", "40"]) == 0  # what plain decoding costs
    text = capsys.readouterr().out
    assert "13.89" in text and "plain" in text and "speculative" not in text
    assert main(["cost", "--tokens-per-second", "40", "--speedup", "2", "--speculative-tokens-per-second", "80"]) == 2
    assert "not both" in capsys.readouterr().err


def test_bench_command_with_peer(tmp_path, dataset, monkeypatch, capsys):
    import draftwise.api
    from draftwise.cli import main

    monkeypatch.setattr(draftwise.api, "LLM", lambda *a, **kw: small_llm())
    out = tmp_path / "cli"
    rc = main(["bench", "--model", "tiny", "--speculator", "ngram", "--speculator", '{"method": "suffix"}',
               "--dataset", str(dataset), "--categories", "qa,translation", "--max-tokens", "16",
               "--out", str(out), "--peers", "hf,llamacpp", "--quiet", "--no-plots", "--dtype", "fp32"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert [m["label"] for m in data["methods"]] == ["plain", "ngram", "suffix", "hf", "llamacpp"]
    assert data["results"]["hf"]["overall"]["tokens_per_second"] > 0
    assert data["results"]["hf"]["overall"]["exact_match"] is not None
    assert data["lossless"]["ok"] is True
    assert "| hf (peer) |" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert main(["bench", "--speculator", "ngram", "--dataset", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "line 1" in capsys.readouterr().err


def test_own_categories_are_kept_as_named(tmp_path):
    """Only an MT-bench file has its eight categories grouped as mt_bench; a dataset of
    one's own with a category called `math` keeps it."""
    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": ["q"]}) + "\n"
                           for i, c in enumerate(["math", "math", "code", "chat"])))
    assert [q.group for q in load_questions(own)] == ["math", "math", "code", "chat"]
    mt = tmp_path / "mt.jsonl"
    cats = ["writing", "roleplay", "reasoning", "math", "coding", "other"]
    mt.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": ["q"]}) + "\n"
                          for i, c in enumerate(cats)))
    assert [q.group for q in load_questions(mt)] == ["mt_bench"] * 5 + ["other"]


def test_bench_without_matplotlib_refuses_before_any_work(dataset, monkeypatch, capsys):
    import importlib.util

    from draftwise.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code = main(["bench", "--model", "no-such-model", "--dataset", str(dataset)])
    err = capsys.readouterr().err
    assert code == 2 and "draftwise[bench]" in err and "no-such-model" not in err  # before loading anything
