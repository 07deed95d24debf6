"""The training loop shared by the head trainers: AdamW, warmup + cosine, checkpoints.

`fit` trains the parameters of `model` that require grad with `objective(batch) ->
(loss, metrics)`. Every `save_every` steps and at the end of each epoch it writes
`checkpoint.pt` (weights, optimizer, step, epoch, position in the epoch, loss history);
with resume=True it continues from there, so the step count carries on. Batch order
depends only on (seed, epoch), so a resumed run sees the batches it had not seen yet.
Precision: bf16 autocast on CUDA when supported ("auto"), fp32 on CPU unless "bf16" is
asked for (CPU bf16 matmuls are slower than fp32 on many CPUs).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from draftwise.train.dataset import Batch, Distilled

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainSettings:
    epochs: int = 2
    lr: float = 1e-3
    seed: int = 0
    batch_size: int = 4
    max_len: int = 512
    warmup: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    save_every: int = 200
    device: str = "cpu"
    precision: str = "auto"  # auto | fp32 | bf16
    progress: bool = True
    max_steps: int | None = None  # stop early (tests, quick runs)


@dataclass
class TrainResult:
    step: int
    epoch: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # {"step", "loss", ...metrics}


def use_bf16(settings: TrainSettings) -> bool:
    if settings.precision == "bf16":
        return True
    if settings.precision == "fp32":
        return False
    return settings.device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def learning_rate(settings: TrainSettings, step: int, total: int) -> float:
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = min(1.0, (step - settings.warmup) / max(1, total - settings.warmup))
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def fit(model: torch.nn.Module, objective: Callable[[Batch], tuple[torch.Tensor, dict[str, float]]],
        data: Distilled, settings: TrainSettings, out: Path, resume: bool = False) -> TrainResult:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.95))
    step, epoch, done_in_epoch, history, spent = 0, 0, 0, [], 0.0
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=settings.device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optim"])
        step, epoch, done_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch"]
        history, spent = ckpt["history"], ckpt.get("seconds", 0.0)
    per_epoch = len(data.epoch_batches(settings.seed, 0, settings.batch_size))
    total = settings.epochs * per_epoch
    if settings.max_steps is not None:
        total = min(total, settings.max_steps)
    bf16 = use_bf16(settings)
    device_type = "cuda" if settings.device.startswith("cuda") else "cpu"
    start = time.perf_counter() - spent

    def save() -> None:
        state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": step, "epoch": epoch,
                 "batch": done_in_epoch, "history": history, "settings": asdict(settings),
                 "seconds": time.perf_counter() - start}
        torch.save(state, out / (CHECKPOINT + ".tmp"))
        (out / (CHECKPOINT + ".tmp")).replace(ckpt_path)

    model.train()
    bar = tqdm(total=total, initial=min(step, total), desc="training", unit="step", disable=not settings.progress)
    log = (out / "train_log.jsonl").open("a")
    while epoch < settings.epochs and step < total:
        batches = data.epoch_batches(settings.seed, epoch, settings.batch_size)
        while done_in_epoch < len(batches) and step < total:
            batch = data.collate(batches[done_in_epoch]).to(settings.device)
            for group in opt.param_groups:
                group["lr"] = learning_rate(settings, step, total)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                loss, metrics = objective(batch)
            opt.zero_grad(set_to_none=True)
            if loss.requires_grad:  # else the batch held nothing to learn (e.g. prompt tokens only)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
                opt.step()
            step += 1
            done_in_epoch += 1
            record = {"step": step, "epoch": epoch, "loss": round(float(loss.detach()), 5),
                      **{k: round(float(v), 4) for k, v in metrics.items()}}
            history.append(record)
            log.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix({k: v for k, v in record.items() if k not in ("step", "epoch")})
            if settings.save_every and step % settings.save_every == 0:
                save()
        if done_in_epoch >= len(batches):
            epoch, done_in_epoch = epoch + 1, 0
        save()
    bar.close()
    log.close()
    model.eval()
    return TrainResult(step, epoch, time.perf_counter() - start, history)
