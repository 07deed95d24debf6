"""The roofline report measures what it names (no timing is asserted)."""

from __future__ import annotations


from conftest import tiny_model
from draftwise.bench.roofline import PASS_SIZES, Roofline, measure, report, weight_bytes
from draftwise.cli import main


def test_measure_and_report_on_a_tiny_model():
    model = tiny_model()
    r = measure(model, context=16, repeats=1)
    assert set(r.pass_seconds) == set(PASS_SIZES) and all(t > 0 for t in r.pass_seconds.values())
    assert r.weight_bytes == weight_bytes(model) == sum(p.numel() * 4 for p in model.parameters())
    text = report(r, "tiny", "fp32", "none")
    for label in ("weights:", "memory bandwidth:", "floor per token:", "pass over n tokens:", "best draft length:"):
        assert label in text


def test_best_k_follows_the_measured_costs():
    flat = Roofline(1, 1.0, {n: 1.0 for n in PASS_SIZES}, "m")
    linear = Roofline(1, 1.0, {n: float(n) for n in PASS_SIZES}, "m")
    assert flat.best_k(0.9) == 15
    assert linear.best_k(0.9) == 0


def test_bench_without_dataset_is_a_clear_error(capsys):
    assert main(["bench", "--model", "x"]) == 2
    assert "needs --dataset" in capsys.readouterr().err
