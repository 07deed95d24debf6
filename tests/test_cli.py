"""The command line: output shapes, stdin, and one-line errors with exit status 2."""

from __future__ import annotations

import io
import json
import sys

import pytest

from draftwise.cli import main


def run_cli(args, capsys, stdin: str | None = None):
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        code = main(args)
    finally:
        sys.stdin = sys.__stdin__
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_and_stats_line(hf_folder, capsys):
    code, out, err = run_cli(["generate", "hello", "--model", str(hf_folder), "--max-tokens", "7", "--json",
                              "--dtype", "fp32"], capsys)
    assert code == 0
    obj = json.loads(out)
    assert set(obj) == {"text", "token_ids", "finish_reason", "stats"}
    assert len(obj["token_ids"]) <= 7 and obj["stats"]["target_passes_per_token"] > 0
    code, out, err = run_cli(["generate", "--model", str(hf_folder), "--max-tokens", "5", "--speculator", "ngram"],
                             capsys, stdin="from stdin")
    assert code == 0 and "target passes per token" in err and "ngram" in err


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--model", "no-such-model"], "smollm2-135m"),
    (["generate", "x", "--model", "{folder}", "--temperature", "-1"], "temperature"),
    (["generate", "x", "--model", "{folder}", "--speculator", "nope"], "unknown speculator"),
    (["generate", "x", "--model", "{folder}", "--speculative-config", "{{bad json"], "not valid JSON"),
    (["generate", "x" * 300, "--model", "{folder}"], "maximum context length"),
    (["generate", "", "--model", "{folder}"], "empty"),
    (["generate", "x", "--model", "{folder}", "--speculator", "draft_model", "--draft-model", "{folder}",
      "--draft-quantization", "w3a9"], "draft_quantization 'w3a9' does not exist"),
    (["generate", "x", "--model", "{folder}", "--draft-quantization", "int8"], "need --speculator"),
    (["generate", "x", "--model", "{folder}", "--lookup", "ngram"], "need --speculator"),
    (["generate", "x", "--model", "{folder}", "--speculator", "ngram", "--lookup", "suffix"], "needs method eagle"),
    (["generate", "x", "--model", "{folder}", "--speculator", "eagle", "--draft-model", "{folder}/nohead"],
     "not an EAGLE head"),
    (["generate", "x", "--model", "{folder}", "--adaptive-state", "{folder}/state"], "needs --speculator adaptive"),
    (["generate", "x", "--model", "{folder}", "--speculator", "adaptive", "--adaptive-state",
      "{folder}/config.json/state"], "cannot write there"),
    (["generate", "x", "--model", "{folder}", "--speculative-config",
      '{{"method": "adaptive", "static": {{"method": "nope"}}}}'], "adaptive: static: unknown speculator"),
])
def test_bad_input_is_one_line_exit_2(hf_folder, capsys, args, message):
    args = [a.format(folder=hf_folder) for a in args]
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("draft_q, want", [(None, "w8a8-all"), ("none", "none"), ("int8", "int8")])
def test_draft_model_takes_its_own_quantization(hf_folder, draft_q, want):
    from draftwise.api import LLM

    spec = {"method": "draft_model", "model": str(hf_folder), "num_speculative_tokens": 2}
    if draft_q is not None:
        spec["draft_quantization"] = draft_q
    llm = LLM(str(hf_folder), dtype="fp32", quantization="w8a8-all", speculative_config=spec, progress=False)
    assert llm.engine.proposer.draft.quantization == want
    assert llm.engine.model.quantization == "w8a8-all"


def test_generate_adaptive_equals_plain_and_takes_a_state_folder(hf_folder, tmp_path, capsys):
    base = ["generate", "hello hello hello", "--model", str(hf_folder), "--max-tokens", "24", "--dtype", "fp32",
            "--json"]
    code, out, err = run_cli(base, capsys)
    assert code == 0, err
    plain = json.loads(out)["token_ids"]
    state = tmp_path / "state"
    code, out, err = run_cli(base + ["--speculator", "adaptive", "--adaptive-state", str(state)], capsys)
    assert code == 0, err
    assert json.loads(out)["token_ids"] == plain
    assert state.is_dir()


def test_the_module_docstring_names_every_command():
    import draftwise.cli as cli

    assert all(f"`{name}`" in cli.__doc__ for name in cli.COMMANDS)


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("draftwise ")


def test_unsupported_architecture_and_unknown_pull_are_one_line(tmp_path, capsys):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                    "vocab_size": 100, "n_embd": 8, "n_layer": 1, "n_head": 1}))
    code, out, err = run_cli(["generate", "x", "--model", str(folder)], capsys)
    assert code == 2 and err.startswith("error: ") and "architecture" in err and "Traceback" not in err
    code, out, err = run_cli(["pull", "nosuchmodel"], capsys)
    assert code == 2 and "not a bundled model" in err and "smollm2-135m" in err


def test_serve_takes_the_model_as_vllm_serve_does(monkeypatch, capsys):
    import draftwise.api

    seen = []

    class Stop(Exception):
        pass

    def fake_llm(model, **kwargs):
        seen.append(model)
        raise Stop

    monkeypatch.setattr(draftwise.api, "LLM", fake_llm)
    with pytest.raises(Stop):
        main(["serve", "qwen2.5-coder-1.5b", "--port", "0"])
    assert seen == ["qwen2.5-coder-1.5b"]
    code, out, err = run_cli(["serve", "a-model", "--model", "b-model"], capsys)
    assert code == 2 and "two models" in err
    code, out, err = run_cli(["serve", "--port", "99999"], capsys)
    assert code == 2 and "--port" in err and "shutdown" not in err


def test_generate_compare_shows_what_speculation_buys(hf_folder, capsys):
    code, out, err = run_cli(["generate", "abcabcabc", "--model", str(hf_folder), "--max-tokens", "12",
                              "--dtype", "fp32", "--speculator", "ngram", "--compare"], capsys)
    assert code == 0 and "outputs identical" in err and "plain:" in err and "x," in err
    code, out, err = run_cli(["generate", "abcabcabc", "--model", str(hf_folder), "--max-tokens", "12",
                              "--dtype", "fp32", "--speculator", "ngram", "--compare", "--json"], capsys)
    obj = json.loads(out)
    assert code == 0 and obj["identical"] is True and obj["speedup"] > 0
    code, out, err = run_cli(["generate", "x", "--model", str(hf_folder), "--compare"], capsys)
    assert code == 2 and "needs a speculator" in err
