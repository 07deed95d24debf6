"""`draftwise train`: self-distilled data, EAGLE / Medusa training end to end, resume."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import EOS_ID, byte_tokenizer, tiny_model
from draftwise.cli import main
from draftwise.sampling import SamplingParams

# prompts written for these tests: short, varied, repetitive enough for a tiny model
TOPICS = ["apples", "rivers", "cables", "sorting", "tables", "clocks", "maps", "loops"]
PROMPTS = [{"prompt": f"Say something about {t}."} for t in TOPICS] + \
          [{"messages": [{"role": "user", "content": f"List three {t}"}]} for t in TOPICS[:4]]


@pytest.fixture(scope="module")
def target_folder(tmp_path_factory):
    """conftest's peaked tiny Llama (4 layers) saved as a Hugging Face folder."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny-target")
    model = tiny_model("llama", torch.float32, seed=0, num_hidden_layers=4)
    c = model.config
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "tie_word_embeddings": False, "eos_token_id": EOS_ID}))
    byte_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def train_cli(method, target, data, out, *extra):
    args = ["train", method, "--target", str(target), "--data", str(data), "--out", str(out), "--max-tokens", "24",
            "--batch-size", "2", "--max-len", "48", "--device", "cpu", "--distill-dtype", "fp32", "--quiet",
            "--lr", "3e-3", *extra]
    assert main(args) == 0


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_distilled_features_are_the_target_hidden_states(tokenizer, tmp_path):
    from draftwise.train.data import build_dataset, distill_layers
    from draftwise.train.dataset import Distilled

    target = tiny_model("llama", torch.float32, seed=0, num_hidden_layers=4)
    folder = tmp_path / "data"
    meta = build_dataset(target, tokenizer, PROMPTS[:3], folder, max_tokens=10, batch_size=2, progress=False)
    assert meta["layers"] == distill_layers(4) == [0, 1, 3] and meta["sequences"] == 3
    data = Distilled(folder, max_len=64)
    ids, feats, prompt_len = data.item(0)
    n = feats.shape[0]
    assert ids.shape[0] == n + 1 and 0 < prompt_len < n
    with torch.inference_mode():
        out = target(ids[None, :n], torch.arange(n)[None], target.new_cache(1, 128), hidden_layers=[0, 1, 3])
    want = torch.cat([out.hidden[i][0] for i in (0, 1, 3)], -1)
    torch.testing.assert_close(feats.float(), want, rtol=0.02, atol=0.02)
    nxt = out.logits[0].argmax(-1)  # greedy answers: each answer token is the target's argmax
    assert torch.equal(nxt[prompt_len - 1: n - 1], ids[prompt_len: n])


def test_train_eagle_end_to_end_loss_drops_resume_continues(target_folder, prompts_file, tmp_path):
    from draftwise.api import LLM
    from draftwise.models.build import load_model

    out = tmp_path / "head"
    train_cli("eagle", target_folder, prompts_file, out, "--epochs", "2", "--draft-vocab", "128", "--ttt-steps", "2")
    first = losses(out)
    steps = len(first)
    assert steps >= 8
    assert sum(first[-3:]) / 3 < sum(first[:3]) / 3, first
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == steps and ckpt["epoch"] == 2
    train_cli("eagle", target_folder, prompts_file, out, "--epochs", "3", "--draft-vocab", "128", "--ttt-steps", "2",
              "--resume")
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == steps + steps // 2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["draftwise_eagle"]["draft_vocab_size"] == 128 and cfg["training"]["steps"] == steps + steps // 2

    target, tok = load_model(str(target_folder), "fp32", "cpu", progress=False)
    spec = {"method": "eagle", "model": str(out), "num_speculative_tokens": 6, "adaptive": False}
    prompts = ["Say something about rivers.", "hello"]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    plain = LLM.from_model(target, tok, max_batch_size=2).generate(prompts, params)
    got = LLM.from_model(target, tok, max_batch_size=2, speculative_config=spec).generate(prompts, params)
    assert [g.token_ids for g in got] == [p.token_ids for p in plain]

    # --init: a new run continues from the trained head (its shape and draft vocabulary win)
    again = tmp_path / "again"
    train_cli("eagle", target_folder, prompts_file, again, "--epochs", "1", "--draft-vocab", "64", "--ttt-steps", "2",
              "--init", str(out), "--lr", "1e-4")
    assert losses(again)[0] < first[0] and losses(again)[0] < sum(first[:3]) / 3
    cfg = json.loads((again / "config.json").read_text())
    assert cfg["draftwise_eagle"]["draft_vocab_size"] == 128 and cfg["training"]["init"] == str(out)


def test_train_init_that_is_no_head_is_refused_before_distilling(target_folder, prompts_file, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["train", "eagle", "--target", str(target_folder), "--data", str(prompts_file), "--out", str(out),
                 "--init", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert code == 2 and "--init" in err and "not a head folder" in err and len(err.strip().splitlines()) == 1
    assert not (out / "data").exists()
    code = main(["train", "medusa", "--target", str(target_folder), "--data", str(prompts_file), "--out", str(out),
                 "--init", "smollm2-135m-eagle"])
    assert code == 2 and "Medusa" in capsys.readouterr().err


def test_train_medusa_saves_loadable_heads(target_folder, prompts_file, tmp_path):
    from draftwise.speculators.medusa import load_medusa

    out = tmp_path / "medusa"
    train_cli("medusa", target_folder, prompts_file, out, "--epochs", "3", "--num-heads", "2", "--lr", "2e-2")
    got = losses(out)
    assert sum(got[-3:]) / 3 < sum(got[:3]) / 3, got
    heads = load_medusa(out)
    assert heads.num_heads == 2 and not heads.own_lm_head


def test_bad_prompt_file_is_one_line_error(target_folder, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    code = main(["train", "eagle", "--target", str(target_folder), "--data", str(bad), "--out", str(tmp_path / "o")])
    assert code == 2 and 'expected an object with "prompt"' in capsys.readouterr().err


class Killed(BaseException):
    """Stands in for a kill: not an Exception, so nothing on the way catches it."""


def test_distillation_killed_midway_resumes_to_the_same_data(tokenizer, tmp_path, monkeypatch):
    from draftwise.engine.engine import Engine
    from draftwise.train import data as data_mod
    from draftwise.train.data import build_dataset

    monkeypatch.setattr(data_mod, "SHARD_SEQUENCES", 2)  # several shards from few prompts
    target = tiny_model("llama", torch.float32, seed=0, num_hidden_layers=4)
    prompts = PROMPTS[:9]
    kw = dict(max_tokens=8, batch_size=1, progress=False)
    whole = build_dataset(target, tokenizer, prompts, tmp_path / "whole", **kw)

    real_step, calls = Engine.step, []

    def dying_step(self):
        calls.append(1)
        if len(calls) == 30:  # in the middle of the second or third shard
            raise Killed
        return real_step(self)

    monkeypatch.setattr(Engine, "step", dying_step)
    with pytest.raises(Killed):
        build_dataset(target, tokenizer, prompts, tmp_path / "resumed", **kw)
    partial = json.loads((tmp_path / "resumed" / "meta.json").read_text())
    assert 0 < partial["prompts_done"] < len(prompts)
    monkeypatch.setattr(Engine, "step", real_step)
    resumed = build_dataset(target, tokenizer, prompts, tmp_path / "resumed", **kw)
    assert resumed["shards"] == whole["shards"] and resumed["tokens"] == whole["tokens"]
    from safetensors.torch import load_file

    for shard in whole["shards"]:
        a, b = load_file(str(tmp_path / "whole" / shard)), load_file(str(tmp_path / "resumed" / shard))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_killed_midway_resumes_to_the_same_head(tokenizer, tmp_path):
    from draftwise.train.data import build_dataset
    from draftwise.train.dataset import Distilled
    from draftwise.train.eagle import EagleObjective, build_head
    from draftwise.train.loop import TrainSettings, fit

    target = tiny_model("llama", torch.float32, seed=0, num_hidden_layers=4)
    build_dataset(target, tokenizer, PROMPTS, tmp_path / "data", max_tokens=12, batch_size=4, progress=False)
    data = Distilled(tmp_path / "data", max_len=32)
    settings = TrainSettings(epochs=2, lr=3e-3, batch_size=2, max_len=32, save_every=3, progress=False, warmup=2)

    def run(out, objective_wrapper=None, resume=False):
        head = build_head(target, data, "eagle3", 64, 0)
        objective = EagleObjective(head, target, data.layers, 2, 0.1)
        fit(head, objective_wrapper(objective) if objective_wrapper else objective, data, settings, out, resume)
        return head

    (tmp_path / "whole").mkdir()
    whole = run(tmp_path / "whole")

    def dying(objective):
        calls = []

        def call(batch):
            calls.append(1)
            if len(calls) == 8:  # step 8: after the checkpoint at step 6, before the one at 9
                raise Killed
            return objective(batch)
        return call

    (tmp_path / "resumed").mkdir()
    with pytest.raises(Killed):
        run(tmp_path / "resumed", dying)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["step"] == 6
    resumed = run(tmp_path / "resumed", resume=True)
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()]
    assert len(steps) > 9


def test_also_data_trains_on_earlier_runs_data_too(tokenizer, tmp_path, capsys):
    """--also-data: the items of another run's data join this run's; data of another target
    is refused, and a folder without data is refused before distilling."""
    from draftwise.errors import BadInput
    from draftwise.train.data import build_dataset
    from draftwise.train.dataset import Distilled

    target = tiny_model("llama", torch.float32, seed=0, num_hidden_layers=4)
    build_dataset(target, tokenizer, PROMPTS[:3], tmp_path / "a", max_tokens=10, batch_size=2, progress=False)
    build_dataset(target, tokenizer, PROMPTS[3:5], tmp_path / "b", max_tokens=10, batch_size=2, progress=False)
    a, b = Distilled(tmp_path / "a", 64), Distilled(tmp_path / "b", 64)
    both = Distilled(tmp_path / "a", 64, also=[tmp_path / "b"])
    assert len(both) == len(a) + len(b) == 5
    for i in range(len(b)):  # b's items come after a's, unchanged
        got, want = both.item(len(a) + i), b.item(i)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]
    other = tiny_model("llama", torch.float32, seed=0, num_hidden_layers=2)
    build_dataset(other, tokenizer, PROMPTS[:1], tmp_path / "c", max_tokens=10, batch_size=2, progress=False)
    with pytest.raises(BadInput, match="another target"):
        Distilled(tmp_path / "a", 64, also=[tmp_path / "c"])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps(PROMPTS[0]) + "\n")
    code = main(["train", "eagle", "--target", "nowhere-model", "--data", str(prompts), "--out", str(tmp_path / "o"),
                 "--also-data", str(tmp_path / "missing"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--also-data" in err and err.count("\n") == 1


def test_the_broad_prompt_mix_is_reproducible_and_covers_its_kinds(tmp_path):
    from draftwise.train.prompts import main as prompts_main

    for name in ("x", "y"):
        assert prompts_main([str(tmp_path / f"{name}.jsonl"), "--mix", "broad", "--count", "300", "--seed", "5"]) == 0
    x = (tmp_path / "x.jsonl").read_text()
    assert x == (tmp_path / "y.jsonl").read_text()
    items = [json.loads(line)["prompt"] for line in x.splitlines()]
    assert len(items) == len(set(items)) == 300
    for marker in ("Translate into English", "Pretend you are", "```python", "How many", "JSON"):
        assert any(marker in p for p in items), marker
