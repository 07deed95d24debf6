"""Plain decoding speed: draftwise's native model against transformers `generate`
(and llama.cpp on the same GGUF file, when llama-cpp-python is installed).

Same weights (the transformers model is built from the tensors draftwise loaded),
same dtype, prompt, token count and machine, measured in one run, alternating the
engines so that background load hits all alike. Also times a cached model load.
llama.cpp runs the GGUF file's own quantized weights with all cores.

    python benchmarks/plain_decode.py --model qwen2.5-coder-1.5b --tokens 64 --repeats 3 --quantization int4-all
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from draftwise.api import LLM
from draftwise.bench.peers import LlamaCppPeer, PeerUnavailable, gguf_path, hf_model
from draftwise.models.build import load_model
from draftwise.models.quantize import QUANTIZATIONS
from draftwise.sampling import SamplingParams

PROMPT = [{"role": "user", "content": "Write a Python class for a bounded LRU cache with get and put, with comments."}]


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                    help="quantize draftwise's projections (transformers stays unquantized in --dtype)")
    args = ap.parse_args()

    load_model(args.model, args.dtype, "cpu", progress=True)  # make sure the cache exists
    start = time.perf_counter()
    model, tok = load_model(args.model, args.dtype, "cpu", progress=False, quantization=args.quantization)
    load_seconds = time.perf_counter() - start
    # transformers gets the unquantized weights in plain layout
    hf = hf_model(model if args.quantization == "none" else load_model(args.model, args.dtype, "cpu", False)[0])

    llm = LLM.from_model(model, tok, max_batch_size=1, max_model_len=2048)
    ids = llm.chat_prompt(PROMPT)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    hf_ids = torch.tensor([ids])

    def ours() -> float:
        t = time.perf_counter()
        out = llm.generate([ids], params)[0]
        return len(out.token_ids) / (time.perf_counter() - t)

    def theirs() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(hf_ids, attention_mask=torch.ones_like(hf_ids), max_new_tokens=args.tokens,
                              min_new_tokens=args.tokens, do_sample=False, pad_token_id=0)
        return (out.shape[1] - len(ids)) / (time.perf_counter() - t)

    engines = {"draftwise plain": ours, "transformers plain": theirs}
    try:
        import llama_cpp  # noqa: F401

        peer = LlamaCppPeer(gguf_path(args.model), list(model.config.eos_token_ids), tok, None, llm.engine.max_model_len)
        greedy_long = SamplingParams(temperature=0.0, max_tokens=args.tokens)  # llama.cpp peer stops only at EOS or max_tokens

        def llamacpp() -> float:
            gen = peer.generate(ids, PROMPT, greedy_long)
            return len(gen.token_ids) / gen.seconds

        engines["llama.cpp plain"] = llamacpp
    except (ImportError, PeerUnavailable) as e:
        print(f"llama.cpp skipped: {e}")
    for fn in engines.values():
        fn()  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, fn in engines.items():
            rates[name].append(fn())
    medians = {name: statistics.median(r) for name, r in rates.items()}
    ra, rb = medians["draftwise plain"], medians["transformers plain"]
    print(f"machine: {machine()}")
    print(f"model: {args.model}, dtype {args.dtype}, draftwise quantization {args.quantization}, prompt {len(ids)} tokens, {args.tokens} new tokens, "
          f"median of {args.repeats}")
    print(f"cached load: {load_seconds:.1f} s")
    for name, rate in medians.items():
        print(f"{name + ':':20} {rate:6.2f} tokens/s")
    print(f"ratio draftwise / transformers: {ra / rb:.2f}")
    if "llama.cpp plain" in medians:
        print(f"ratio draftwise / llama.cpp:    {ra / medians['llama.cpp plain']:.2f}")


if __name__ == "__main__":
    main()
