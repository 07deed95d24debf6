"""`draftwise generate`: stream one completion to the terminal, then a stats line.

Structured output: `--json-schema FILE`, `--regex R`, `--choice A,B` or `--grammar FILE`
(one of them) constrains the completion; an unreadable file or an invalid constraint is an
`error:` line (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys

from draftwise.models.quantize import QUANTIZATIONS

DEFAULT_MODEL = "smollm2-135m"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate text for one prompt (streamed), with optional speculation",
        description="Generate a completion for PROMPT (or stdin) and print one stats line: tokens, tokens/s, "
                    "target forward passes per output token, mean accepted length.",
    )
    p.add_argument("prompt", nargs="?", help="the prompt; read from stdin when omitted")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"bundled name, .gguf file or HF folder (default {DEFAULT_MODEL})")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_sampling_args(p)
    add_constraint_args(p)
    add_model_args(p)
    add_speculation_args(p)
    p.add_argument("--compare", action="store_true",
                   help="first decode without speculation, then with it, on the same prompt: print both speeds, the "
                        "speedup, target passes per token, and whether the two outputs are identical")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, finish_reason, stats")
    p.set_defaults(run=run)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def add_constraint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="FILE", default=None,
                   help="the output is JSON matching the JSON schema in FILE (one line, as json.dumps writes it)")
    g.add_argument("--regex", metavar="R", default=None, help="the output matches the regular expression R")
    g.add_argument("--choice", metavar="A,B", default=None, help="the output is one of these comma-separated strings")
    g.add_argument("--grammar", metavar="FILE", default=None,
                   help="the output follows the Lark or GBNF grammar in FILE (llguidance's syntax)")


def constraint_from_args(args: argparse.Namespace):
    """The StructuredOutputsParams the flags ask for, or None."""
    from draftwise.constraints import StructuredOutputsParams
    from draftwise.errors import BadInput

    if getattr(args, "json_schema", None) is not None:
        text = _read(args.json_schema, "--json-schema")
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput(f"--json-schema {args.json_schema}: not JSON ({e})") from None
        if not isinstance(schema, dict):
            raise BadInput(f"--json-schema {args.json_schema}: a JSON schema is an object")
        return StructuredOutputsParams(json=schema)
    if getattr(args, "regex", None) is not None:
        return StructuredOutputsParams(regex=args.regex)
    if getattr(args, "choice", None) is not None:
        choices = [c for c in args.choice.split(",") if c]
        if not choices:
            raise BadInput("--choice needs at least one non-empty string (A,B,...)")
        return StructuredOutputsParams(choice=choices)
    if getattr(args, "grammar", None) is not None:
        return StructuredOutputsParams(grammar=_read(args.grammar, "--grammar"))
    return None


def _read(path: str, flag: str) -> str:
    from draftwise.errors import BadInput

    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{flag}: cannot read {path} ({e.strerror if isinstance(e, OSError) else e})") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"], help="weights and compute dtype (default bf16)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    g.add_argument("--revision", default=None,
                   help="for a Hugging Face Hub id (org/name): the branch, tag or commit to load (default main)")
    g.add_argument("--max-model-len", type=int, default=None, help="context window to allocate (default: the model's, at most 8192)")
    g.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                   help="quantization (default none): int8 = the decoder projections' weights in int8, "
                        "reading half the bytes; w8a8 = int8 weights and int8 activations, whose pass over 8 "
                        "tokens costs about one token's (best with speculation on CPU); int4 = 4-bit weights "
                        "(groups of 32), a quarter; w4a8 = 4-bit weights and int8 activations in draftwise's own CPU kernel "
                        "(built with the system C compiler on first use): the fewest bytes per pass, a pass over 4 "
                        "tokens ~1.15x one (fastest on CPU); -all = the LM head in int8 too")


def add_speculation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculation")
    g.add_argument("--speculator", default=None, help="draft_model, ngram, suffix, ... (default: none, plain decoding)")
    g.add_argument("--draft-model", default=None,
                   help="what the speculator drafts with: for draft_model a bundled name or path; for "
                        "eagle / medusa a head folder or a shipped head (see `draftwise models`)")
    g.add_argument("--num-speculative-tokens", type=int, default=None, help="draft length (the maximum when adaptive)")
    g.add_argument("--draft-quantization", default=None, metavar="Q",
                   help="draft_model: quantization of the draft model, apart from the target's (default: none "
                        "beside an unquantized target, w4a8-all beside a w4a8 one, else w8a8-all)")
    g.add_argument("--lookup", default=None, choices=("ngram", "suffix"),
                   help="--speculator eagle: also graft this lookup method's draft onto the head's tree (one "
                        "verifying pass checks both; its nodes are kept by its measured acceptance)")
    g.add_argument("--speculative-config", default=None,
                   help='JSON, vLLM style: \'{"method": "draft_model", "model": "...", "num_speculative_tokens": 4}\'')
    g.add_argument("--adaptive-state", default=None, metavar="DIR",
                   help="--speculator adaptive: save the head it learns from traffic (and its controller's "
                        "estimates) in DIR now and then and at shutdown, and resume from DIR at start")


def speculative_config_from_args(args: argparse.Namespace):
    from draftwise.errors import BadInput

    spec = _speculative_config(args)
    state = getattr(args, "adaptive_state", None)
    if state is not None:
        if spec is None or spec.method != "adaptive":
            raise BadInput("--adaptive-state needs --speculator adaptive")
        spec = spec.model_copy(update={"adaptive_state": state})
    return spec


def _speculative_config(args: argparse.Namespace):
    from draftwise.config import parse_speculative_config
    from draftwise.errors import BadInput

    if args.speculative_config and args.speculator:
        raise BadInput("give either --speculator or --speculative-config, not both")
    if args.speculative_config:
        if args.draft_quantization is not None:
            raise BadInput('put the draft quantization inside --speculative-config ("draft_quantization")')
        if args.lookup is not None:
            raise BadInput('put the lookup inside --speculative-config ("lookup")')
        return parse_speculative_config(args.speculative_config)
    if args.speculator:
        cfg: dict = {"method": args.speculator}
        if args.draft_model:
            cfg["model"] = args.draft_model
        if args.num_speculative_tokens is not None:
            cfg["num_speculative_tokens"] = args.num_speculative_tokens
        if args.draft_quantization is not None:
            cfg["draft_quantization"] = args.draft_quantization
        if args.lookup is not None:
            cfg["lookup"] = args.lookup
        return parse_speculative_config(cfg)
    if (args.draft_model or args.num_speculative_tokens is not None or args.draft_quantization is not None
            or args.lookup is not None):
        raise BadInput("--draft-model / --num-speculative-tokens / --draft-quantization / --lookup need --speculator")
    return None


def sampling_from_args(args: argparse.Namespace):
    from draftwise.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, stop=args.stop,
        structured_outputs=constraint_from_args(args),
    )


class TextStreamer:
    """Prints newly decoded text as tokens arrive; holds back what a stop string could still cut."""

    def __init__(self, tokenizer, hold: int) -> None:
        self.tokenizer, self.hold, self.printed = tokenizer, hold, 0

    def __call__(self, out) -> None:
        req = out.request
        if req.finished:
            text = req.stop_text if req.stop_text is not None else self._decode(req.output_ids)
            self._emit(text)
            return
        text = self._decode(req.output_ids)
        if text.endswith("\ufffd"):  # half of a multi-byte character
            return
        self._emit(text[: max(self.printed, len(text) - self.hold)])

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _emit(self, text: str) -> None:
        if len(text) > self.printed:
            sys.stdout.write(text[self.printed:])
            sys.stdout.flush()
            self.printed = len(text)


def run(args: argparse.Namespace) -> int:
    from draftwise.api import LLM
    from draftwise.errors import BadInput

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise BadInput("the prompt is empty (give PROMPT or pipe text to stdin)")
    params = sampling_from_args(args)
    spec = speculative_config_from_args(args)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, speculative_config=spec, max_batch_size=1,
              max_model_len=args.max_model_len, quantization=args.quantization, revision=args.revision)
    ids = llm.chat_prompt([{"role": "user", "content": prompt}]) if args.chat else llm.encode_prompt(prompt)
    try:
        return compare(llm, ids, params, spec, args.json) if args.compare else _generate(llm, ids, params, spec, args)
    finally:
        llm.close()  # adaptive: the learner stops and its state is saved


def _generate(llm, ids: list[int], params, spec, args: argparse.Namespace) -> int:
    streamer = None if args.json else TextStreamer(llm.tokenizer, max((len(s) for s in params.stop), default=1) - 1)
    out = llm.generate([ids], params, on_output=streamer)[0]
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                          "stats": out.stats}))
        return 0
    s = out.stats
    method = spec.method if spec else "plain"
    print(f"\n[{len(out.token_ids)} tokens, {s['tokens_per_second']:.1f} tokens/s, "
          f"{s['target_passes_per_token']:.2f} target passes per token, mean accepted length "
          f"{s['mean_accepted_length']:.2f}, {method}, finish: {out.finish_reason}]", file=sys.stderr)
    return 0


def compare(llm, ids: list[int], params, spec, as_json: bool) -> int:
    """Plain decoding, then speculation, on the same prompt and settings: what speculation buys."""
    from draftwise.errors import BadInput

    if spec is None:
        raise BadInput("--compare needs a speculator (--speculator NAME) to compare plain decoding with")
    plain_llm = llm.with_speculation(None)
    plain_llm.generate([ids], params.model_copy(update={"max_tokens": 4}))  # warm-up: first-call costs
    llm.generate([ids], params.model_copy(update={"max_tokens": 4}))
    if not as_json:
        print("--- plain decoding", file=sys.stderr)
    plain = plain_llm.generate([ids], params, on_output=None if as_json else TextStreamer(llm.tokenizer, 0))[0]
    if not as_json:
        print(f"\n--- {spec.method}", file=sys.stderr)
    fast = llm.generate([ids], params, on_output=None if as_json else TextStreamer(llm.tokenizer, 0))[0]
    same = plain.token_ids == fast.token_ids
    p, f = plain.stats, fast.stats
    speedup = f["tokens_per_second"] / p["tokens_per_second"] if p["tokens_per_second"] else 0.0
    if as_json:
        print(json.dumps({"identical": same, "speedup": round(speedup, 3), "plain": p, spec.method: f,
                          "text": fast.text}))
        return 0
    print(f"\n[plain: {len(plain.token_ids)} tokens, {p['tokens_per_second']:.1f} tokens/s | {spec.method}: "
          f"{len(fast.token_ids)} tokens, {f['tokens_per_second']:.1f} tokens/s, {speedup:.2f}x, "
          f"{f['target_passes_per_token']:.2f} target passes per token (plain 1.00), mean accepted length "
          f"{f['mean_accepted_length']:.2f} | outputs {'identical' if same else 'DIFFERENT'}]", file=sys.stderr)
    return 0
