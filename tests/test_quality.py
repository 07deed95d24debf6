"""The quantization quality report: perplexity and agreement computed as named."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import tiny_model
from draftwise.bench.quality import CHUNK, default_text, measure, read_text, report, score
from draftwise.errors import BadInput
from draftwise.models.quantize import quantize


def test_score_is_the_teacher_forced_nll_across_chunks():
    model = tiny_model(max_position_embeddings=1024)
    torch.manual_seed(0)
    ids = torch.randint(0, 260, (CHUNK + 40,)).tolist()  # two chunks
    nll, preds = score(model, ids)
    logits = model(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1)[None], model.new_cache(1, len(ids))).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    ref = -lp.gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
    assert nll == pytest.approx(ref, rel=1e-4)
    assert preds.shape == (len(ids) - 1,) and (preds == lp.argmax(-1)).float().mean() > 0.99


def test_measure_puts_the_reference_first_and_compares_with_it():
    model = tiny_model("llama", torch.bfloat16, std=0.1)
    ids = torch.randint(0, 260, (60,)).tolist()
    rows = measure(lambda m: quantize(copy.deepcopy(model), m), ["int8", "int4"], ids)
    assert [r.quantization for r in rows] == ["none", "int8", "int4"]
    assert rows[0].agreement == 1.0 and rows[0].perplexity == pytest.approx(math.exp(score(model, ids)[0]))
    assert rows[2].weight_bytes < rows[1].weight_bytes < rows[0].weight_bytes
    assert all(0.0 <= r.agreement <= 1.0 and r.perplexity > 1.0 for r in rows)
    text = report(rows, "tiny", "bf16", len(ids))
    assert "| int4 |" in text and "60 tokens" in text


def test_texts(tmp_path):
    assert "class Catalogue" in default_text()
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(BadInput, match="empty"):
        read_text(str(empty))
    with pytest.raises(BadInput, match="cannot read"):
        read_text(str(tmp_path / "missing.txt"))
