"""`draftwise stats --state DIR`: what an adaptive state has learned, read from its files
(no model is loaded): the traffic it learned from and stores, training steps and loss,
and each part's measured acceptance now and at the state's first save."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("stats", help="what an adaptive state (--adaptive-state DIR) has learned",
                       description="Show what an --adaptive-state folder holds: requests and tokens learned from, "
                                   "the stored traffic, training steps and loss, and each part's measured "
                                   "acceptance (tokens accepted per draft) now and at the state's first save.")
    p.add_argument("--state", required=True, metavar="DIR", help="the folder given to --adaptive-state")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.set_defaults(run=run)


def summary(folder: Path) -> dict:
    from draftwise.errors import BadInput
    from draftwise.speculators.adaptive import STATE, AdaptiveState, read_state, saved_window_tokens

    saved = read_state(folder, "--state")
    if saved is None:
        raise BadInput(f"--state {folder}: no adaptive state there ({STATE} missing)")
    target = saved.get("target")
    state = AdaptiveState(folder, target)
    saved = state.saved or {}

    def acceptance(arbiter: dict | None) -> dict[str, float]:
        return {part: round(e, 3) for part, e in saved_window_tokens(arbiter).items()}

    learner = saved.get("learner", {})
    return {"state": str(folder), "target": target, "head": saved.get("head"),
            "learned_from": {"requests": learner.get("requests", 0), "tokens": learner.get("tokens", 0)},
            "stored_traffic": state.traffic_summary(),
            "training": {"steps": learner.get("steps", 0), "first_loss": learner.get("first_loss"),
                         "last_loss": learner.get("loss")},
            "acceptance": {"now": acceptance(saved.get("arbiter")),
                           "first_save": acceptance(saved.get("arbiter_first", saved.get("arbiter")))}}


def run(args: argparse.Namespace) -> int:
    data = summary(Path(args.state).expanduser())
    if args.json:
        print(json.dumps(data))
        return 0
    tr, learned, stored = data["training"], data["learned_from"], data["stored_traffic"]

    def loss(x) -> str:
        return "-" if x is None else f"{x:.3f}"

    print(f"state {data['state']} (target {data['target']})")
    print(f"head: {data['head'] or 'none trained yet'}")
    print(f"learned from: {learned['requests']} requests, {learned['tokens']} tokens")
    print(f"stored traffic: {stored['sequences']} sequences, {stored['tokens']} tokens, "
          f"{stored['bytes'] / 1e6:.1f} MB")
    print(f"training: {tr['steps']} steps, loss {loss(tr['first_loss'])} first, {loss(tr['last_loss'])} last")
    print("tokens accepted per draft, by part (now / at the first save):")
    for part, now in data["acceptance"]["now"].items():
        print(f"  {part:8s} {now:.2f} / {data['acceptance']['first_save'].get(part, now):.2f}")
    return 0
