"""The roofline report measures what it names (no timing is asserted)."""

from __future__ import annotations


from conftest import tiny_model
from draftwise.models.packed import pack
from draftwise.bench.roofline import PASS_SIZES, Roofline, measure, pass_bytes, report, weight_bytes
from draftwise.cli import main


def test_measure_and_report_on_a_tiny_model():
    model = tiny_model()
    r = measure(model, context=16, repeats=1)
    assert set(r.pass_seconds) == set(PASS_SIZES) and all(t > 0 for t in r.pass_seconds.values())
    assert r.weight_bytes == weight_bytes(model) == sum(p.numel() * 4 for p in model.parameters())
    embedding = model.model.embed_tokens.weight.numel() * 4  # untied: a pass reads only its rows
    assert r.pass_bytes == pass_bytes(model) == r.weight_bytes - embedding
    text = report(r, "tiny", "fp32", "none")
    for label in ("weights:", "memory bandwidth:", "floor per token:", "pass over n tokens:", "best draft length:"):
        assert label in text


def test_best_k_follows_the_measured_costs():
    flat = Roofline(1, 1, 1.0, {n: 1.0 for n in PASS_SIZES}, "m")
    linear = Roofline(1, 1, 1.0, {n: float(n) for n in PASS_SIZES}, "m")
    assert flat.best_k(0.9) == 15
    assert linear.best_k(0.9) == 0


def test_a_pass_reads_the_head_copy_not_the_table_it_came_from():
    model = pack(tiny_model(tie_word_embeddings=True))  # the packed head is a copy of the table
    table = model.model.embed_tokens.weight.numel() * 4
    assert pass_bytes(model) == weight_bytes(model) - table
    tied = tiny_model(tie_word_embeddings=True)  # no copy: the pass reads the table as the head
    assert pass_bytes(tied) == weight_bytes(tied)


def test_bench_without_dataset_is_a_clear_error(capsys):
    assert main(["bench", "--model", "x"]) == 2
    assert "needs --dataset" in capsys.readouterr().err
