"""Check draftwise's CUDA path on a GPU, and time it.

    python benchmarks/cuda_check.py [--device cuda] [--model smollm2-135m] [--json out.json]

1. Batch invariance, the property greedy exactness rests on: a token's logits must be
   bit-identical whether it is decoded alone or verified among others. Checked on
   random-weight models with the shapes of SmolLM2-135M and Qwen2.5-Coder-1.5B (a few
   layers), bf16 and fp32, at short and long contexts (tests/test_exactness.py's recipe).
   A probe of `F.linear` alone says which row counts the device's matmul treats alike.
2. Through the engine: greedy speculative output equals plain decoding, token for token,
   for each speculator and each quantization setting the device takes; seeded sampled
   speculation repeats itself.
3. Timing: output tokens/s of plain decoding and of each speculator, and the roofline
   (a pass over 1-16 tokens against the memory floor).

`--model` is a bundled name, GGUF file or HF folder (needs the real weights); without it
(or when it cannot be loaded) the engine checks run on a random-weight model of the
SmolLM2 shape. Prints a table; exits 1 if any exactness check fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from draftwise.api import LLM
from draftwise.bench.roofline import measure, report, timed
from draftwise.errors import DraftwiseError
from draftwise.models.config import ModelConfig
from draftwise.models.transformer import Transformer
from draftwise.sampling import SamplingParams

SHAPES = {  # random-weight stand-ins with the real models' widths (fewer layers)
    "smollm2-shape": dict(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                          num_hidden_layers=4, num_attention_heads=9, num_key_value_heads=3, head_dim=64),
    "qwen1.5b-shape": dict(architecture="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                           num_hidden_layers=3, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                           attention_bias=True),
}
PASSES = [2, 5, 1, 9, 3, 4, 6]  # token counts of the verification passes (30 tokens in all)
PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome, with a docstring and three doctests.",
    "Explain the difference between a list and a tuple in Python, with examples.",
    "Summarize: The quick brown fox jumps over the lazy dog. The dog sleeps. The fox runs away into the forest.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]
SPECULATORS = {
    "ngram": {"method": "ngram", "num_speculative_tokens": 4},
    "suffix": {"method": "suffix", "num_speculative_tokens": 8},
    "draft_model(self)": {"method": "draft_model", "num_speculative_tokens": 6},
    "layer_skip": {"method": "layer_skip", "num_speculative_tokens": 4},
    "eagle": {"method": "eagle", "model": "smollm2-135m-eagle", "num_speculative_tokens": 16},
}
QUANTIZATIONS = ["int8", "int8-all", "w8a8", "w8a8-all", "int4", "int4-all", "w4a8"]


def random_model(shape: str, dtype: torch.dtype, device: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(**SHAPES[shape], max_position_embeddings=4096, eos_token_ids=[0])
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype).eval()


def filler_tokenizer(vocab_size: int):
    """For a random model: the 256 byte tokens, then placeholder tokens up to `vocab_size`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab.update({f"<t{i}>": i for i in range(256, vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<t256>")


def linear_probe(device: str, dtype: torch.dtype, k: int = 1536, n: int = 8960) -> list[int]:
    """Row counts m for which row 0 of `F.linear(x[:m], w)` differs from the one-row result."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(64, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) * 0.02).to(device, dtype)
    one = torch.nn.functional.linear(x[:1], w)[0]
    return [m for m in range(2, 65) if not torch.equal(torch.nn.functional.linear(x[:m], w)[0], one)]


def prefill(model: Transformer, cache, row: int, prompt: torch.Tensor) -> None:
    """Prompt `[1, n]` into cache `row`, committed."""
    n = prompt.shape[1]
    model(prompt, torch.arange(n, device=model.device)[None], cache, rows=torch.tensor([row], device=model.device))
    cache.set_length(row, n)


def decode_alone(model: Transformer, cache, row: int, prompt: torch.Tensor, seq: torch.Tensor) -> list[torch.Tensor]:
    """Logits of each token of `seq` `[n]` decoded one at a time after `prompt` in cache `row`."""
    prefill(model, cache, row, prompt)
    n, one, out = prompt.shape[1], torch.tensor([row], device=model.device), []
    for i in range(seq.shape[0]):
        pos = torch.tensor([[n + i]], device=model.device)
        out.append(model(seq[None, i : i + 1], pos, cache, rows=one).logits[0, 0])
        cache.set_length(row, n + i + 1)
    return out


def invariance(model: Transformer, context: int) -> tuple[int, float]:
    """(tokens whose logits differ between chunked passes and one-token passes, max abs diff)."""
    dev = model.device
    g = torch.Generator(device="cpu").manual_seed(1)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, context), generator=g).to(dev)
    seq = torch.randint(0, vocab, (1, sum(PASSES)), generator=g).to(dev)

    ref = decode_alone(model, model.new_cache(1, context + 64), 0, prompt, seq[0])
    cache, got, done = model.new_cache(1, context + 64), [], 0
    prefill(model, cache, 0, prompt)
    for t in PASSES:
        pos = (context + done + torch.arange(t, device=dev))[None]
        got += list(model(seq[:, done : done + t], pos, cache).logits[0])
        done += t
        cache.set_length(0, context + done)
    bad = [(a.float() - b.float()).abs().max().item() for a, b in zip(ref, got) if not torch.equal(a, b)]
    return len(bad), max(bad, default=0.0)


def batched_invariance(model: Transformer, contexts=(37, 90, 150, 700)) -> tuple[int, float]:
    """The same for rows of different lengths verified together, each against its row decoded alone."""
    dev, vocab = model.device, model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(2)
    prompts = [torch.randint(0, vocab, (1, n), generator=g).to(dev) for n in contexts]
    seqs = torch.randint(0, vocab, (len(contexts), 15), generator=g).to(dev)
    def new_cache():  # the same size for the rows alone and together
        return model.new_cache(len(prompts), max(contexts) + 16)

    refs = [decode_alone(model, new_cache(), row, p, seqs[row]) for row, p in enumerate(prompts)]
    cache = new_cache()
    for row, p in enumerate(prompts):
        prefill(model, cache, row, p)
    bad, done = [], 0
    for t in [2, 5, 1, 4, 3]:
        pos = torch.tensor([[n + done + j for j in range(t)] for n in contexts], device=dev)
        logits = model(seqs[:, done : done + t], pos, cache).logits
        for row, n in enumerate(contexts):
            for j in range(t):
                a, b = logits[row, j], refs[row][done + j]
                if not torch.equal(a, b):
                    bad.append((a.float() - b.float()).abs().max().item())
            cache.set_length(row, n + done + t)
        done += t
    return len(bad), max(bad, default=0.0)


def engine_checks(llm: LLM, rows: list, label: str, max_tokens: int, failures: list,
                  model_name: str | None = None) -> None:
    """Plain vs each speculator (greedy), and a seeded sampled run twice; appends rows."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    prompts = [llm.encode_prompt(p) for p in PROMPTS]
    llm.set_speculation(None)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
    plain, sec = generate_timed(llm, prompts, params)
    ref = [o.token_ids for o in plain]
    tokens = sum(len(r) for r in ref)
    rows.append({"setting": label, "method": "plain", "tokens_per_s": tokens / sec, "passes_per_token": 1.0,
                 "equal": True})
    for name, spec in SPECULATORS.items():
        if name.startswith("draft_model") and model_name:
            spec = {**spec, "model": model_name}
        try:
            llm.set_speculation(spec)
            outs, sec = generate_timed(llm, prompts, params)
        except Exception as e:  # a speculator this model cannot take (no head for it, ...): say why
            rows.append({"setting": label, "method": name, "skipped": f"{type(e).__name__}: {e}".splitlines()[0][:90]})
            continue
        equal = [o.token_ids for o in outs] == ref
        passes = sum(o.stats["target_passes"] for o in outs) / max(1, sum(len(o.token_ids) for o in outs))
        rows.append({"setting": label, "method": name, "tokens_per_s": tokens / sec, "passes_per_token": passes,
                     "equal": equal})
        if not equal:
            failures.append(f"{label} {name}: speculative output differs from plain decoding")
    # sampled: a seed repeats itself. The draft length is fixed: an adaptive one follows
    # measured timings, and each draft token draws one uniform from the request's stream
    llm.set_speculation({**SPECULATORS["ngram"], "adaptive": False})
    sp = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True)
    same_seed = [o.token_ids for o in llm.generate(prompts, sp)] == [o.token_ids for o in llm.generate(prompts, sp)]
    rows.append({"setting": label, "method": "sampled, same seed twice", "equal": same_seed})
    if not same_seed:
        failures.append(f"{label}: seeded sampling did not repeat itself")


def generate_timed(llm: LLM, prompts, params) -> tuple[list, float]:
    """(outputs, seconds) of one `generate`, the device's work finished before and after."""
    outs: list = []
    return outs, timed(lambda: outs.extend(llm.generate(prompts, params)), llm.model.device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default=None, help="real model to check through the engine (default: random weights)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--quick", action="store_true", help="fewer shapes and settings (for a CPU smoke run)")
    p.add_argument("--json", default=None, help="also write every number here")
    args = p.parse_args(argv)
    dev = args.device
    failures: list[str] = []
    out: dict = {"device": torch.cuda.get_device_name(0) if dev.startswith("cuda") else platform.processor(),
                 "torch": torch.__version__}
    print(f"device: {out['device']}, torch {torch.__version__}", flush=True)

    dtypes = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float32]
    out["linear_probe"] = {str(d): linear_probe(dev, d) for d in dtypes}
    for d, ms in out["linear_probe"].items():
        print(f"F.linear 1536->8960 {d}: row 0 differs from the one-row result at m = {ms or 'none'}", flush=True)

    out["invariance"] = []
    for shape in SHAPES if not args.quick else ["smollm2-shape"]:
        for dtype in dtypes:
            model = random_model(shape, dtype, dev)
            for context in (37, 700):
                bad, diff = invariance(model, context)
                out["invariance"].append({"shape": shape, "dtype": str(dtype), "context": context,
                                          "differing_tokens": bad, "max_diff": diff})
                print(f"invariance {shape} {dtype} context {context}: {bad}/30 tokens differ (max {diff:.3g})",
                      flush=True)
                if bad:
                    failures.append(f"invariance {shape} {dtype} context {context}: {bad}/30 tokens differ")
            bad, diff = batched_invariance(model)
            out["invariance"].append({"shape": shape, "dtype": str(dtype), "context": "4 rows batched",
                                      "differing_tokens": bad, "max_diff": diff})
            print(f"invariance {shape} {dtype} 4 rows of 37-700 batched: {bad}/60 tokens differ (max {diff:.3g})",
                  flush=True)
            if bad:
                failures.append(f"invariance {shape} {dtype} batched rows: {bad}/60 tokens differ")
            del model

    rows: list[dict] = []
    real = None
    if args.model:
        try:
            real = LLM(args.model, device=dev, max_batch_size=len(PROMPTS), progress=False)
        except DraftwiseError as e:
            print(f"--model {args.model} not loaded ({e}); the engine checks use random weights", flush=True)
    if real is not None:
        engine_checks(real, rows, f"{args.model} bf16", args.max_tokens, failures, args.model)
        model = real.model
        out["roofline"] = report(measure(model), args.model, "bf16", "none")
        print(out["roofline"], flush=True)
        del real, model
        for q in QUANTIZATIONS[:2] if args.quick else QUANTIZATIONS:
            try:
                llm = LLM(args.model, device=dev, max_batch_size=len(PROMPTS), progress=False, quantization=q)
            except DraftwiseError as e:
                rows.append({"setting": f"{args.model} {q}", "method": "load", "skipped": str(e)[:100]})
                continue
            engine_checks(llm, rows, f"{args.model} {q}", args.max_tokens, failures, args.model)
            del llm
    else:
        model = random_model("smollm2-shape", torch.bfloat16, dev)
        llm = LLM.from_model(model, filler_tokenizer(model.config.vocab_size), max_batch_size=len(PROMPTS),
                             draft_model=model)
        engine_checks(llm, rows, "random smollm2-shape bf16", args.max_tokens, failures)
    out["engine"] = rows
    print(f"\n{'setting':28} {'method':30} {'tok/s':>8} {'passes/tok':>10}  equal to plain")
    for r in rows:
        if "skipped" in r:
            print(f"{r['setting']:28} {r['method']:30} skipped: {r['skipped']}")
            continue
        tps = f"{r['tokens_per_s']:8.1f}" if "tokens_per_s" in r else " " * 8
        ppt = f"{r['passes_per_token']:10.2f}" if "passes_per_token" in r else " " * 10
        print(f"{r['setting']:28} {r['method']:30} {tps} {ppt}  {r['equal']}")
    out["failures"] = failures
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print("\n" + ("all exactness checks passed" if not failures else "FAILED:\n  " + "\n  ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
