"""Peer engines on the same model, dtype, prompts and machine, for a fair comparison.

- `hf`: transformers `generate` (plain), on a Hugging Face model built around the very
  tensors the draftwise target holds (no second copy of the weights).
- `hf-assisted`: transformers assisted generation (`assistant_model=`) with the same draft
  model as the benchmark's first `draft_model` speculator.
- `hf-lookup`: transformers prompt lookup decoding (`prompt_lookup_num_tokens=`), draft
  length and n-gram size from the benchmark's first `ngram` speculator (else 4 and 4).
- `llamacpp`, `llamacpp-lookup`: llama-cpp-python on the same GGUF file (its quantized
  weights, so its numbers are not expected to match bit for bit), plain and with
  `LlamaPromptLookupDecoding`. Optional: skipped with a note when the package is missing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from draftwise.bench.methods import Method
from draftwise.bench.settings import BenchSettings, Generation
from draftwise.sampling import SamplingParams


class PeerUnavailable(Exception):
    """This peer cannot run here; the message says why (shown as a note, not an error)."""


def hf_config(cfg, dtype: torch.dtype):
    """A transformers config equal to a native `ModelConfig`."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=list(cfg.eos_token_ids) or None, hidden_act="silu",
    )
    if cfg.architecture in ("llama", "qwen3"):
        kwargs["attention_bias"] = cfg.attention_bias
    if cfg.architecture in ("mistral", "qwen2", "qwen3"):
        kwargs["sliding_window"] = None
    hf = AutoConfig.for_model(cfg.architecture, **kwargs)
    hf.dtype = dtype
    return hf


def hf_model(native) -> Any:
    """A transformers causal LM sharing the native model's weight tensors (copies of those
    the native model holds packed)."""
    from transformers import AutoModelForCausalLM

    from draftwise.models.packed import plain_state_dict

    config = hf_config(native.config, native.dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=native.dtype)
    state = {k: v for k, v in plain_state_dict(native).items() if k != "inv_freq"}
    expected = model.state_dict()
    for name, t in expected.items():  # e.g. Qwen2 always has q/k/v biases: zeros when the model has none
        if name not in state and name.endswith(".bias"):
            state[name] = torch.zeros(t.shape, dtype=native.dtype, device=native.device)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise PeerUnavailable(f"cannot map the weights onto transformers (missing {missing[:3]}, extra {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    rotary = type(model.model.rotary_emb)(config=config)
    model.model.rotary_emb = rotary.to(native.device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise PeerUnavailable(f"transformers model has uninitialised tensors: {leftover[:3]}")
    return model.eval()


class HFPeer:
    """transformers `generate`: plain, assisted (draft model) or prompt lookup."""

    def __init__(self, model, tokenizer, eos_ids: list[int], assistant=None, lookup: tuple[int, int] | None = None):
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.assistant, self.lookup = assistant, lookup

    def generate(self, prompt_ids: list[int], messages: list[dict[str, str]], params: SamplingParams) -> Generation:
        from transformers import GenerationConfig
        from transformers.utils import logging as hf_logging

        device = self.model.device
        ids = torch.tensor([prompt_ids], device=device)
        gc = GenerationConfig(
            max_new_tokens=params.max_tokens, do_sample=params.temperature > 0,
            temperature=params.temperature if params.temperature > 0 else None, top_p=None, top_k=None,
            eos_token_id=self.eos_ids or None, pad_token_id=(self.eos_ids or [0])[0],
        )
        kw: dict[str, Any] = {}
        if self.assistant is not None:
            kw["assistant_model"] = self.assistant
        if self.lookup is not None:
            gc.prompt_lookup_num_tokens, gc.max_matching_ngram_size = self.lookup
        if params.seed is not None:
            torch.manual_seed(params.seed)
        quiet = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # assisted generation warns about its own internal call
        try:
            sync(device)
            start = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc, **kw)
            sync(device)
        finally:
            hf_logging.set_verbosity(quiet)
        seconds = time.perf_counter() - start
        new = out[0, len(prompt_ids):].tolist()
        stop = next((i for i, t in enumerate(new) if t in self.eos_ids), None)
        if stop is not None:
            new = new[: stop + 1]
        reason = "stop" if stop is not None else "length"
        return Generation(new, self.tokenizer.decode(new, skip_special_tokens=True), seconds, reason)

    def close(self) -> None:
        self.model = self.assistant = None


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def first_config(methods: Sequence[Method], method: str):
    return next((m.config for m in methods if m.config is not None and m.config.method == method), None)


def assistant_model(llm, methods: Sequence[Method], settings: BenchSettings):
    cfg = first_config(methods, "draft_model")
    if cfg is None:
        raise PeerUnavailable("hf-assisted needs a draft_model speculator among --speculator (its draft is used)")
    draft = getattr(llm, "_draft_model", None)
    if draft is None:
        from draftwise.models.build import load_model

        draft, _ = load_model(cfg.model, llm.model.dtype, str(llm.model.device), progress=False)
    return hf_model(draft)


def gguf_path(ref: str) -> Path:
    from draftwise.models import bundled

    path = Path(ref).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise PeerUnavailable(f"{ref} is not a GGUF model (llama.cpp reads GGUF files only)")
    if ref in bundled.BUNDLED:
        return bundled.ensure(ref, progress=False)
    raise PeerUnavailable(f"{ref} is not a GGUF file or a bundled model name")


class LlamaCppPeer:
    """llama-cpp-python on the same GGUF file, fed the same prompt token ids."""

    def __init__(self, path: Path, eos_ids: list[int], tokenizer, lookup: int | None, n_ctx: int) -> None:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=lookup) if lookup else None
        gpu_layers = -1 if torch.cuda.is_available() else 0
        # with a draft, llama-cpp-python keeps logits of every position but sizes its score
        # buffer by `logits_all` (0.3.36): without it, prompts over n_batch tokens crash
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=os.cpu_count(), n_gpu_layers=gpu_layers,
                                   draft_model=draft, logits_all=draft is not None, verbose=False)
        self.eos_ids = set(eos_ids) | {self.llm.token_eos()}
        self.tokenizer = tokenizer

    def generate(self, prompt_ids: list[int], messages: list[dict[str, str]], params: SamplingParams) -> Generation:
        new: list[int] = []
        reason = "length"
        start = time.perf_counter()
        for tok in self.llm.generate(prompt_ids, temp=params.temperature, top_k=1 if params.temperature == 0 else 0,
                                     top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            new.append(int(tok))
            if tok in self.eos_ids:
                reason = "stop"
                break
            if len(new) >= params.max_tokens:
                break
        seconds = time.perf_counter() - start
        return Generation(new, self.tokenizer.decode(new, skip_special_tokens=True), seconds, reason)

    def close(self) -> None:
        self.llm.close() if hasattr(self.llm, "close") else None
        self.llm = None


def make_peer(name: str, llm, methods: Sequence[Method], settings: BenchSettings):
    """Build the peer `name` for the benchmark's loaded target; PeerUnavailable if it can't run."""
    eos_ids = list(llm.model.config.eos_token_ids)
    if name.startswith("hf"):
        model = hf_model(llm.model)
        if name == "hf":
            return HFPeer(model, llm.tokenizer, eos_ids)
        if name == "hf-assisted":
            return HFPeer(model, llm.tokenizer, eos_ids, assistant=assistant_model(llm, methods, settings))
        ngram = first_config(methods, "ngram")
        lookup = (ngram.num_speculative_tokens, ngram.prompt_lookup_max) if ngram else (4, 4)
        return HFPeer(model, llm.tokenizer, eos_ids, lookup=lookup)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise PeerUnavailable("llama-cpp-python is not installed (pip install 'draftwise[llamacpp]')") from None
    ngram = first_config(methods, "ngram")
    lookup = (ngram.num_speculative_tokens if ngram else 4) if name == "llamacpp-lookup" else None
    return LlamaCppPeer(gguf_path(settings.model), eos_ids, llm.tokenizer, lookup, llm.engine.max_model_len)


def standing_notes(methods: Sequence[Method]) -> list[str]:
    notes = []
    if any(m.peer and m.peer.startswith("llamacpp") for m in methods):
        notes.append("llama.cpp runs the GGUF file's quantized weights with its own kernels; its outputs are not "
                     "expected to equal draftwise's token for token.")
    if any(m.peer and m.peer.startswith("hf") for m in methods):
        notes.append("transformers peers run on the same tensors as draftwise; different kernels can still flip a "
                     "near-tie argmax in bf16, so a peer's exact match below 100% is not a draftwise bug.")
    return notes
