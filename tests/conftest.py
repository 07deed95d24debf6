"""Shared fixtures: tiny random-weight models and a byte-level tokenizer, built in the test."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from draftwise.models.config import ModelConfig
from draftwise.models.transformer import Transformer

EOS_ID = 256  # the byte tokenizer's only special token


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens (GPT-2 byte-to-unicode alphabet, no merges) plus <eos> = 256."""
    vocab = {ch: b for b, ch in byte_alphabet().items()}
    vocab["<eos>"] = EOS_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return fast


def byte_alphabet() -> dict[int, str]:
    """The byte-level pre-tokenizer's printable stand-in for each byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tiny_config(arch: str = "llama", **overrides) -> ModelConfig:
    base = dict(
        architecture=arch, vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        attention_bias=arch == "qwen2", qk_norm=arch == "qwen3", eos_token_ids=[EOS_ID],
    )
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, std: float = 0.2,
               **overrides) -> Transformer:
    """A random model whose logits are peaked enough to make greedy text repetitive."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config(arch, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, std)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (a lot on a busy machine).
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


def check_seeded_and_top1_greedy(llm, target, tokenizer, prompts, max_tokens: int = 16) -> None:
    """Sampled speculation: the same seed gives the same tokens, and top_k=1 sampling
    gives exactly plain greedy decoding (no sampling option is silently dropped)."""
    from draftwise.api import LLM
    from draftwise.sampling import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(prompts, sp)] == [o.token_ids for o in llm.generate(prompts, sp)]
    greedy = LLM.from_model(target, tokenizer, max_batch_size=len(prompts)).generate(
        prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    top1 = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=1.5, top_k=1, seed=3,
                                                ignore_eos=True))
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]
