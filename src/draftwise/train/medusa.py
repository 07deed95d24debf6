"""Training Medusa heads on self-distilled data (saved in `speculators/medusa.py`'s layout).

Head i reads the target's final-normed state at position t and predicts the token i+1
places after the target's own next token, i.e. token t+i+2; its label is the target's
distribution at position t+i+1 (self-distillation, as Medusa-2 does), loss weight 0.8^i.
Blocks start as the identity (zero weights), so each head starts as the target's own
next-token head; by default the heads share the target's LM head (frozen), which keeps
them small (`own_lm_head=True` trains a copy per head).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from draftwise.speculators.medusa import MedusaHeads, save_medusa
from draftwise.train.dataset import Batch, Distilled
from draftwise.train.loop import TrainSettings, fit


class MedusaObjective:
    def __init__(self, heads: MedusaHeads, target, data_layers: list[int]) -> None:
        last = target.config.num_hidden_layers - 1
        self.heads, self.target = heads, target
        self.h = target.config.hidden_size
        self.slot = data_layers.index(last)

    def head_logits(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Head i on final-normed states [N, H] -> logits [N, vocab] (MedusaHeads' math, with grad)."""
        for block in self.heads.blocks[i]:
            x = x + F.silu(F.linear(x, block.weight, block.bias))
        weight = self.heads.lm_heads[i].weight if self.heads.own_lm_head else self.target.head_weight
        return F.linear(x, weight)

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        t = batch.feats.shape[1]
        device = batch.feats.device
        with torch.no_grad():
            last = batch.feats[..., self.slot * self.h: (self.slot + 1) * self.h].float()
            normed = self.target.model.norm(last)  # [b, T, H]
            idx = torch.arange(t, device=device)[None]
        total = torch.zeros((), device=device)
        metrics: dict[str, float] = {}
        for i in range(self.heads.num_heads):
            ahead = i + 1  # label position
            valid = (idx + ahead < batch.lengths[:, None]) & (idx + ahead + 1 >= batch.prompt_lens[:, None])
            if not valid.any():
                continue
            with torch.no_grad():
                label_states = torch.cat([normed[:, ahead:], normed[:, :ahead] * 0], dim=1)[valid]  # [N, H]
                p = F.linear(label_states, self.target.head_weight).float().softmax(-1)  # [N, vocab]
            logq = self.head_logits(i, normed[valid]).float().log_softmax(-1)
            ce = -(p * logq).sum(-1).mean()
            total = total + 0.8**i * ce
            metrics[f"ce{i}"] = float(ce.detach())
            metrics[f"acc{i}"] = float((logq.argmax(-1) == p.argmax(-1)).float().mean())
        return total, metrics


def train_medusa(target, data: Distilled, out: str | Path, settings: TrainSettings, *, num_heads: int = 4,
                 num_layers: int = 1, own_lm_head: bool = False, resume: bool = False):
    """Train heads on `data` and save them in `out` (medusa.json + medusa.safetensors)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target.requires_grad_(False)
    cfg = target.config
    torch.manual_seed(settings.seed)
    heads = MedusaHeads(cfg.hidden_size, cfg.vocab_size, num_heads, num_layers, own_lm_head)
    with torch.no_grad():
        for name, p in heads.named_parameters():
            if name.startswith("blocks."):
                p.zero_()
            else:
                p.copy_(target.head_weight.detach().float())
    heads = heads.to(settings.device)
    result = fit(heads, MedusaObjective(heads, target, data.layers), data, settings, out, resume)
    save_medusa(heads, out)
    return heads, result
