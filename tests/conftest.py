"""Shared fixtures: tiny random-weight models and a byte-level tokenizer, built in the test."""

from __future__ import annotations

import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from draftwise.cache import BLOCK, KVCache
from draftwise.kernels import w4a8
from draftwise.models.config import ModelConfig
from draftwise.models.packed import pack
from draftwise.models.transformer import ModelOutput, Transformer
from draftwise.speculators.base import Draft, Proposer

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
               variant: str = "plain", **overrides) -> Transformer:
    """A random model whose logits are peaked enough to make greedy text repetitive.
    `variant`: "plain", "packed" (oneDNN-packed projections, as `load_model` gives on the
    CPU), or "torch-attention" (decode and verify attention in torch operations, as on
    CUDA, instead of the C kernel)."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config(arch, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, std)
    model = model.to(dtype).eval()
    if variant == "torch-attention":
        model.attention_kernel = False
    return pack(model) if variant == "packed" else model


VARIANTS = ["plain", "packed", "torch-attention"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (a lot on a busy machine).
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face folder, with the byte tokenizer (CLI tests)."""
    import transformers as tf

    folder = tmp_path_factory.mktemp("tiny-hf")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=EOS_ID)
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


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
        prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    top1 = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=1.5, top_k=1, seed=3,
                                                ignore_eos=True))
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]


class OracleTree(Proposer):
    """A test proposer that knows each prompt's plain greedy output and proposes a tree in
    which that continuation is one path, each of its nodes listed after a decoy sibling, so
    the accepted nodes sit at scattered cache slots (the hard case for exactness). Every
    `cut_every`-th level the path token is wrong, so acceptance lengths vary."""

    name = "oracle_tree"

    def __init__(self, reference: dict[tuple[int, ...], list[int]], vocab_size: int, cut_every: int = 5) -> None:
        self.reference, self.vocab, self.cut_every, self.levels = reference, vocab_size, cut_every, 0

    def propose(self, requests, num_tokens):
        tokens, parents = [], []
        for req, n in zip(requests, num_tokens):
            ref, done = self.reference[tuple(req.prompt_ids)], len(req.output_ids)
            toks, pars, parent = [], [], -1
            for d in range(min(n // 2, len(ref) - done)):
                truth = ref[done + d]
                self.levels += 1
                path = (truth + 1) % self.vocab if self.levels % self.cut_every == 0 else truth
                toks += [(truth + 2) % self.vocab, path]
                pars += [parent, parent]
                parent = len(toks) - 1
            tokens.append(toks)
            parents.append(pars)
        return Draft(tokens, parents, [None] * len(requests))


def oracle_tree_outputs(model, tokenizer, prompts, params, plain_outputs, max_batch_size: int, nodes: int = 8):
    """Run `prompts` with the oracle tree proposer; returns the finished RequestStates."""
    from draftwise.engine.controller import FixedController
    from draftwise.engine.engine import Engine

    reference = {tuple(p): list(o.token_ids) for p, o in zip(prompts, plain_outputs)}
    engine = Engine(model, tokenizer, proposer=OracleTree(reference, model.config.vocab_size), controller=FixedController(nodes),
                    max_batch_size=max_batch_size, max_speculative_tokens=nodes)
    reqs = [engine.add_request(p, params) for p in prompts]
    engine.run_until_done()
    return reqs


# --- a scripted target, and drafts of fixed acceptance -------------------------------------


def script_next(token: int) -> int:
    """The scripted target's next token after `token`, whatever came before: the next byte."""
    return (token + 1) % 256


class ScriptedTarget(torch.nn.Module):
    """A weightless stand-in for the target whose greedy continuation is fixed by a script:
    after token t it puts (all but) all its probability on `script_next(t)`, whatever the
    context. Plain decoding's output is then known without running a model, a pass costs
    next to nothing, and drafts written against the script (`FixedAcceptance`) are
    accepted exactly as far as they follow it. It takes the native decoder's call
    (`Transformer.forward`) and hands out a real KV cache, which stays empty: the engine's
    bookkeeping (lengths, kept tree paths) runs as with a model."""

    def __init__(self, max_position_embeddings: int = 1024) -> None:
        super().__init__()
        self.config = tiny_config(num_hidden_layers=1, max_position_embeddings=max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        c = self.config
        cap = min(capacity, c.max_position_embeddings) + BLOCK
        return KVCache(1, batch_size, c.num_key_value_heads, c.head_dim, cap, self.dtype, self.device)

    def forward(self, ids, positions, cache, *, tree_mask=None, rows=None, logits_at=None, hidden_layers=(),
                compute_logits=True) -> ModelOutput:
        nxt = (ids + 1) % 256  # script_next of every fed token   [batch, T]
        if logits_at is not None:
            nxt = torch.gather(nxt, 1, logits_at)
        logits = torch.full((*nxt.shape, self.config.vocab_size), -1e4)  # [batch, n, vocab]
        logits.scatter_(-1, nxt[..., None], 0.0)
        hidden = {layer: torch.zeros(*ids.shape, self.config.hidden_size) for layer in hidden_layers}
        return ModelOutput(logits if compute_logits else None, hidden)


class FixedAcceptance(Proposer):
    """Drafts for a `ScriptedTarget` of exactly set acceptance: a request's n-th draft
    (counted per request) follows the script for `accept[n % len(accept)]` tokens, then
    goes wrong, so verification accepts exactly min(that, budget) tokens (greedy; sampled,
    all but surely). Each draft fills its budget; `parents` None (a chain) unless `tree`,
    which lists the same chain as a tree (node j the child of node j - 1)."""

    name = "fixed_acceptance"

    def __init__(self, accept, tree: bool = False) -> None:
        self.accept, self.tree = list(accept), tree
        self.drafts: dict[str, int] = {}  # request id -> drafts made

    def propose(self, requests, num_tokens):
        draft = Draft.empty(len(requests))
        for i, (req, k) in enumerate(zip(requests, num_tokens)):
            if k <= 0:
                continue
            n = self.drafts.get(req.request_id, 0)
            self.drafts[req.request_id] = n + 1
            right, token = self.accept[n % len(self.accept)], req.all_ids[-1]
            for j in range(k):
                token = script_next(token) if j != right else (script_next(token) + 1) % 256
                draft.tokens[i].append(token)
            draft.parents[i] = list(range(-1, k - 1)) if self.tree else None
        return draft


def decode_alone(model, prompt: torch.Tensor, seq: torch.Tensor) -> list[torch.Tensor]:
    cache = model.new_cache(1, prompt.shape[1] + seq.shape[1])
    n = prompt.shape[1]
    model(prompt, torch.arange(n)[None], cache)
    cache.set_length(0, n)
    out = []
    for i in range(seq.shape[1]):
        out.append(model(seq[:, i : i + 1], torch.tensor([[n + i]]), cache).logits[0, 0])
        cache.set_length(0, n + i + 1)
    return out


def tree_with_decoys(path: list[int]) -> tuple[list[int], list[int]]:
    """A tree holding `path` with a decoy sibling listed before each of its nodes, and a
    decoy child under each decoy: the path's nodes land at scattered slots."""
    tokens, parents, parent = [], [], -1
    for tok in path:
        base = len(tokens)
        tokens += [(tok + 3) % 260, (tok + 5) % 260, tok]
        parents += [parent, base, parent]
        parent = base + 2
    return tokens, parents


def check_tree_pass(model, prompts: list[torch.Tensor], paths: list[torch.Tensor]) -> None:
    """Prefill each prompt [1, n] in its own row, verify all rows together as trees holding
    `paths` [1, d] (root first) among decoys, and check that each node on a path gives the
    logits of decoding that path one token at a time."""
    cache = model.new_cache(len(prompts), max(p.shape[1] for p in prompts) + 64)
    for row, p in enumerate(prompts):
        model(p, torch.arange(p.shape[1])[None], cache, rows=torch.tensor([row]))
        cache.set_length(row, p.shape[1])
    trees = [tree_with_decoys(path[0, 1:].tolist()) for path in paths]
    t = 1 + max(len(tok) for tok, _ in trees)
    ids, pos = torch.zeros(len(prompts), t, dtype=torch.long), torch.zeros(len(prompts), t, dtype=torch.long)
    mask = torch.eye(t, dtype=torch.bool).repeat(len(prompts), 1, 1)
    on_path = []
    for row, ((tokens, parents), path, p) in enumerate(zip(trees, paths, prompts)):
        ids[row, 0], ids[row, 1 : len(tokens) + 1] = path[0, 0], torch.tensor(tokens)
        depth = [0]
        mask[row, :, 0] = True
        for j, par in enumerate(parents):  # node j is fed at index j + 1
            depth.append(depth[par + 1] + 1)
            mask[row, j + 1] |= mask[row, par + 1]
        pos[row, : len(depth)] = p.shape[1] + torch.tensor(depth)
        on_path.append([0] + [3 * d + 3 for d in range(len(tokens) // 3)])
    logits = model(ids, pos, cache, tree_mask=mask).logits
    for row, (p, path) in enumerate(zip(prompts, paths)):
        ref = decode_alone(model, p, path)
        for d, node in enumerate(on_path[row]):
            assert torch.equal(logits[row, node], ref[d]), f"row {row}, depth {d}"


def needs_w4a8():
    """Skip where the w4a8 kernel cannot be built (no C compiler), except in CI, where it must run."""
    why = w4a8.available()
    return pytest.mark.skipif(why is not None and not os.environ.get("CI"), reason=f"w4a8 kernel: {why}")
