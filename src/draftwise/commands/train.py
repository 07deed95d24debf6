"""`draftwise train {eagle,medusa,adaptive}`: train a speculation head for a target by self-distillation,
or catch an adaptive state's head up on the traffic it stored.

The target answers the prompts of --data greedily (draftwise's own engine) and its hidden
states and next-token distributions become the labels; the head is trained on them and
saved in --out, ready for `--speculator eagle|medusa --draft-model OUT`. The distilled
data (OUT/data) and a checkpoint (OUT/checkpoint.pt) make --resume pick up where a run stopped.

`train adaptive --state DIR` trains the head of an `--adaptive-state DIR` on the traffic
stored there (`train/adaptive.py`), until --max-steps or --max-minutes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train an EAGLE head or Medusa heads for a target model (self-distillation), or an "
                      "adaptive state's head on its stored traffic",
        description="eagle, medusa: answer the prompts of --data with the target, then train a speculation head on "
                    "its hidden states and next-token distributions (training prompts must not come from the "
                    "benchmark). adaptive: train the head of an --adaptive-state folder on the traffic it stored, "
                    "until --max-steps or --max-minutes, or earlier when the loss on a tenth of the traffic held out "
                    "stops falling (then the best head is kept); resumable, run it overnight or from cron; the "
                    "next process using the state serves the result.",
    )
    p.add_argument("method", choices=["eagle", "medusa", "adaptive"])
    p.add_argument("--target", help="target model: bundled name, .gguf file or HF folder (adaptive: default the "
                                    "state's own)")
    p.add_argument("--data", help='eagle, medusa: JSONL prompts: {"prompt": "..."} or {"messages": [...]} per line')
    p.add_argument("--out", help="eagle, medusa: output folder (head, distilled data, checkpoint)")
    a = p.add_argument_group("adaptive")
    a.add_argument("--state", metavar="DIR", help="the --adaptive-state folder to train")
    a.add_argument("--max-minutes", type=float, default=None, help="stop after this many minutes")
    a.add_argument("--quantization", default="none", metavar="Q",
                   help="the target's quantization while training (default none; the same as when serving is fine)")
    a.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="the target's dtype (default bf16)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=256, help="answer length per prompt when distilling (default 256)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt and OUT/data")
    g = p.add_argument_group("details")
    g.add_argument("--batch-size", type=int, default=4, help="sequences per training step (default 4)")
    g.add_argument("--max-len", type=int, default=512, help="tokens per training window (default 512)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in all (adaptive: this "
                   "run's steps; default 500 when --max-minutes is not given either)")
    g.add_argument("--also-data", action="append", default=[], metavar="DIR",
                   help="also train on data distilled earlier for the same target (another run's OUT/data); "
                        "repeatable")
    g.add_argument("--limit", type=int, default=None, help="use the first N prompts only")
    g.add_argument("--distill-batch", type=int, default=8, help="requests the target answers at once (default 8)")
    g.add_argument("--no-chat", action="store_true", help='do not wrap "prompt" strings in the chat template')
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="training compute: auto = bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--distill-dtype", default="bf16", choices=["bf16", "fp32"], help="target dtype while answering")
    g.add_argument("--distill-quantization", default="none", metavar="Q",
                   help="quantize the target while answering (e.g. w4a8-all, the fastest CPU setting); "
                        "training then reloads it unquantized for the labels (default none)")
    g.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (default 200)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    e = p.add_argument_group("eagle")
    e.add_argument("--style", default="eagle3", choices=["eagle3", "eagle1"],
                   help="eagle3: fused low/mid/high features, own reduced-vocab LM head; eagle1: last layer only")
    e.add_argument("--draft-vocab", type=int, default=8192,
                   help="eagle3 draft vocabulary size, 0 = full (default 8192)")
    e.add_argument("--intermediate-size", type=int, default=None,
                   help="width of the head's MLP (default: the target's; smaller drafts faster on a CPU)")
    e.add_argument("--weights", default="fp32", choices=["fp32", "bf16", "int8"],
                   help="how the saved head stores its weights (int8: per-row scales, a quarter of fp32)")
    e.add_argument("--init", default=None, metavar="HEAD",
                   help="continue training a head (a folder or a shipped name, e.g. qwen2.5-coder-1.5b-eagle) on this "
                        "data instead of starting fresh; its shape and draft vocabulary are kept (use a lower --lr)")
    e.add_argument("--ttt-steps", type=int, default=3, help="training-time-test unroll steps (default 3)")
    e.add_argument("--reg-weight", type=float, default=None, help="feature regression weight (default 0.1; eagle1: 10)")
    m = p.add_argument_group("medusa")
    m.add_argument("--num-heads", type=int, default=4)
    m.add_argument("--num-layers", type=int, default=1)
    m.add_argument("--own-lm-head", action="store_true",
                   help="train an LM head per Medusa head (default: share the target's)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from draftwise.errors import BadInput

    if args.method == "adaptive":
        return run_adaptive(args)
    missing = [f"--{name}" for name in ("target", "data", "out") if getattr(args, name) is None]
    if missing:
        raise BadInput(f"train {args.method} needs {', '.join(missing)}")
    return run_distill(args)


def run_adaptive(args: argparse.Namespace) -> int:
    import sys

    from draftwise.api import LLM
    from draftwise.errors import BadInput
    from draftwise.speculators.adaptive import STATE, TRAFFIC, read_state
    from draftwise.train.adaptive import train_adaptive

    if args.state is None:
        raise BadInput("train adaptive needs --state DIR (the folder given to --adaptive-state)")
    folder = Path(args.state).expanduser()
    if not (folder / STATE).is_file() and not (folder / TRAFFIC).is_file():
        raise BadInput(f"--state {args.state}: no adaptive state there (serve or generate with "
                       f"--speculator adaptive --adaptive-state {args.state} first)")
    saved = (read_state(folder, "--state") or {}).get("target")
    if args.target is not None and saved is not None and args.target != saved:  # before loading any weights
        raise BadInput(f"--state {args.state} was learned on {saved}, not {args.target}")
    target = args.target or saved
    if not target:
        raise BadInput(f"--state {args.state}: {STATE} names no target; give --target")
    max_steps = args.max_steps if args.max_steps is not None or args.max_minutes is not None else 500
    spec = {"method": "adaptive", "adaptive_state": str(folder),
            "learner": {"train_share": 0.0, "train_when_idle": False}}  # this process trains in its own loop
    llm = LLM(target, dtype=args.dtype, quantization=args.quantization, speculative_config=spec)
    try:
        result = train_adaptive(llm.engine.proposer, max_steps, args.max_minutes, progress=not args.quiet)
    finally:
        llm.close()
    if result.stopped_by == "no traffic":
        print(f"{args.state} holds {result.traffic_tokens} tokens of traffic, less than one training batch: "
              "nothing to train yet (serve or generate with this state first)")
        return 0
    print(json.dumps({"state": str(folder), "target": target, "steps": result.steps,
                      "total_steps": result.total_steps, "first_loss": result.first_loss,
                      "last_loss": result.last_loss, "seconds": round(result.seconds, 1),
                      "traffic_tokens": result.traffic_tokens, "held_out_sequences": result.held_out,
                      "held_out_first_loss": result.held_out_first, "held_out_best_loss": result.held_out_best,
                      "stopped_by": result.stopped_by}))
    if result.stopped_by == "interrupted":
        print("interrupted: what was trained is saved", file=sys.stderr)
        return 130
    return 0


def run_distill(args: argparse.Namespace) -> int:
    import torch

    from draftwise.errors import BadInput
    from draftwise.models.build import default_device, load_model
    from draftwise.train.data import build_dataset, read_prompts
    from draftwise.train.dataset import Distilled, read_meta
    from draftwise.train.loop import TrainSettings

    out = Path(args.out)
    if args.init is not None:  # refuse before an hour of distillation, not after
        from draftwise.heads import resolve

        if args.method != "eagle":
            raise BadInput("--init continues an EAGLE head; Medusa heads always start fresh")
        if not (resolve(args.init) / "config.json").is_file():
            raise BadInput(f"--init {args.init}: not a head folder (no config.json) nor a shipped head name")
    for extra in args.also_data:  # refuse before distilling, not after
        try:
            read_meta(Path(extra))
        except BadInput as e:
            raise BadInput(f"--also-data {e}") from None
    device = args.device or default_device()
    progress = not args.quiet
    prompts = read_prompts(args.data)[: args.limit]
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    target, tokenizer = load_model(args.target, args.distill_dtype, device, progress, args.distill_quantization)
    meta = build_dataset(target, tokenizer, prompts, out / "data", max_tokens=args.max_tokens,
                         batch_size=args.distill_batch, chat=not args.no_chat, progress=progress)
    distill_seconds = time.perf_counter() - t0
    if args.distill_quantization != "none":  # labels and frozen pieces from the unquantized weights
        del target
        target, _ = load_model(args.target, "fp32", device, progress)
    elif args.distill_dtype != "fp32":
        target = target.float()  # labels and frozen pieces in fp32
    data = Distilled(out / "data", args.max_len, also=args.also_data)
    settings = TrainSettings(epochs=args.epochs, lr=args.lr, seed=args.seed, batch_size=args.batch_size,
                             max_len=args.max_len, save_every=args.save_every, device=device,
                             precision=args.precision, progress=progress, max_steps=args.max_steps)
    notes = {"target": args.target, "data": str(args.data), "prompts": len(prompts), "sequences": meta["sequences"],
             "distilled_tokens": meta["tokens"], "max_tokens": args.max_tokens,
             **({"also_data": [str(d) for d in args.also_data]} if args.also_data else {}),
             "distill_quantization": args.distill_quantization,
             "distill_seconds": meta.get("seconds", round(distill_seconds, 1))}
    if args.method == "eagle":
        from draftwise.train.eagle import train_eagle

        _, result = train_eagle(target, data, out, settings, style=args.style, draft_vocab=args.draft_vocab,
                                steps=args.ttt_steps, reg_weight=args.reg_weight, resume=args.resume,
                                intermediate_size=args.intermediate_size, weights=args.weights, notes=notes,
                                init=args.init)
    else:
        from draftwise.train.medusa import train_medusa

        _, result = train_medusa(target, data, out, settings, num_heads=args.num_heads, num_layers=args.num_layers,
                                 own_lm_head=args.own_lm_head, resume=args.resume)
    last = result.history[-1] if result.history else {}
    print(json.dumps({"out": str(out), "method": args.method, "steps": result.step, "epochs": result.epoch,
                      "train_seconds": round(result.seconds, 1), "final": last, **notes}))
    return 0
