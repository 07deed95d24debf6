"""Training an EAGLE head on self-distilled data (the objective: speculators/eagle/loss.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from draftwise.errors import BadInput
from draftwise.speculators.eagle import (EagleHead, EagleObjective, config_for_target, default_eagle3_layers,
                                         init_head_from_target, load_eagle_head, save_eagle_head)
from draftwise.train.dataset import Distilled
from draftwise.train.loop import TrainSettings, fit


def draft_vocabulary(data: Distilled, vocab: int, size: int) -> torch.Tensor | None:
    """Target ids of the `size` most frequent tokens in the data, ascending; None for the full vocabulary."""
    if not size or size >= vocab:
        return None
    counts = data.token_counts(vocab).float()
    counts += torch.linspace(1e-3, 0, vocab)  # ties: lower ids first
    return counts.topk(size).indices.sort().values


def build_head(target, data: Distilled, style: str, draft_vocab: int, seed: int,
               intermediate_size: int | None = None) -> EagleHead:
    tcfg = target.config
    layers = default_eagle3_layers(tcfg.num_hidden_layers) if style == "eagle3" else [tcfg.num_hidden_layers - 1]
    ids = draft_vocabulary(data, tcfg.vocab_size, draft_vocab)
    cfg = config_for_target(tcfg, style, len(ids) if ids is not None else None, layers)
    if intermediate_size:
        cfg = cfg.model_copy(update={"intermediate_size": intermediate_size})
    return init_head_from_target(cfg, target, ids, seed)


def start_from(init: str | Path, target, data: Distilled) -> EagleHead:
    """A trained head (a folder or a shipped name) to train further, in fp32 with gradients; its
    shape, draft vocabulary and feature layers are kept, so they must be ones the data recorded."""
    head = load_eagle_head(init, target).float()
    missing = [i for i in head.config.resolved_layers(target.config.num_hidden_layers) if i not in data.layers]
    if missing:
        raise BadInput(f"--init {init} reads target layers {missing} that the distilled data did not record "
                       f"(it has {data.layers})")
    return head.requires_grad_(True)


def train_eagle(target, data: Distilled, out: str | Path, settings: TrainSettings, *, style: str = "eagle3",
                draft_vocab: int = 8192, steps: int = 3, reg_weight: float | None = None, resume: bool = False,
                intermediate_size: int | None = None, weights: str = "fp32", notes: dict[str, Any] | None = None,
                init: str | Path | None = None):
    """Train a head on `data` and save it (our layout) in `out`; returns (head, TrainResult).
    `init`: continue from a trained head (its architecture wins over style / draft_vocab /
    intermediate_size) instead of a fresh one."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target.requires_grad_(False)
    if init is not None:
        head = start_from(init, target, data)
        style = head.config.style
    else:
        head = build_head(target, data, style, draft_vocab if style == "eagle3" else 0, settings.seed,
                          intermediate_size)
    head = head.to(settings.device)
    if reg_weight is None:
        reg_weight = 10.0 if style == "eagle1" else 0.1  # EAGLE-1: L_reg + 0.1 L_cls
    objective = EagleObjective(head, target, data.layers, steps, reg_weight)
    result = fit(head, objective, data, settings, out, resume)
    training = {"method": "eagle", "style": style, "steps": result.step, "epochs": result.epoch,
                "seconds": round(result.seconds, 1), "ttt_steps": steps, "reg_weight": reg_weight,
                "lr": settings.lr, "batch_size": settings.batch_size, "max_len": settings.max_len,
                "seed": settings.seed, "init": str(init) if init is not None else None,
                "final": result.history[-1] if result.history else None}
    save_eagle_head(head, out, {"training": {**training, **(notes or {})}}, weights)
    return head, result
