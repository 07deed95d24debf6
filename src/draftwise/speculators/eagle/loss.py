"""The EAGLE training objective, shared by offline training (`draftwise train eagle`) and
the adaptive speculator's online learner.

Loss per unrolled step s (weight 0.8^s), on the pairs whose label predicts an answer token:
- cross-entropy of the head's distribution against the target's next-token distribution
  (soft labels: the target's LM head over its stored final state, restricted to the
  draft vocabulary and renormalized there, as EAGLE-3 does);
- feature regression (smooth L1) of the head's output against the feature it stands in
  for: the target's next final-normed state (eagle1, EAGLE-1's loss) or the fused input
  the head would see at the next position, fc(features), held fixed (eagle3).
Total = CE + reg_weight * regression.

Safe points (the online learner, which must stop a step soon when a request arrives):
with `between`, the LM-head parts, the longest single operations of a step (the labels,
and each unrolled step's logits with their backward: 450-660 ms at once on the 1.5B, one
thread), run in pieces of `piece_rows` rows, with `between()` called before each piece
in forward and after each piece in backward. The loss is the same sum.

Training-time test (EAGLE-3): step 0 runs the pairs with the target's features; step s
re-runs every position with the head's own step s-1 output of the position before it
in place of the feature, attending to the true pairs up to s positions back and to its
own chain of drafted pairs, exactly the view the head has at draft depth s+1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from draftwise.errors import BadInput
from draftwise.speculators.eagle.head import EagleHead


@dataclass
class Batch:
    ids: torch.Tensor  # [b, T+1] tokens 0..T of each window (0-padded)
    feats: torch.Tensor  # [b, T, len(layers) * H] bf16 target states of tokens 0..T-1
    lengths: torch.Tensor  # [b] target-run tokens of each window (<= T)
    prompt_lens: torch.Tensor  # [b] prompt tokens inside each window (may be <= 0)

    def to(self, device) -> "Batch":
        return Batch(self.ids.to(device), self.feats.to(device), self.lengths.to(device), self.prompt_lens.to(device))

    @classmethod
    def of_windows(cls, windows: list[tuple[torch.Tensor, torch.Tensor, int]]) -> "Batch":
        """Right-padded batch of windows (ids [n+1], feats [n, F], prompt tokens inside)."""
        t = max(f.shape[0] for _, f, _ in windows)
        ids = torch.zeros(len(windows), t + 1, dtype=torch.long)
        feats = torch.zeros(len(windows), t, windows[0][1].shape[-1], dtype=windows[0][1].dtype)
        for j, (i, f, _) in enumerate(windows):
            ids[j, : i.shape[0]] = i
            feats[j, : f.shape[0]] = f
        return cls(ids, feats, torch.tensor([f.shape[0] for _, f, _ in windows]),
                   torch.tensor([p for _, _, p in windows]))

    def split(self, size: int) -> list["Batch"]:
        """The windows in batches of at most `size`, each trimmed to its own longest window."""
        parts = []
        for a in range(0, self.ids.shape[0], max(1, size)):
            lengths = self.lengths[a: a + size]
            t = int(lengths.max())
            parts.append(Batch(self.ids[a: a + size, : t + 1], self.feats[a: a + size, :t], lengths,
                               self.prompt_lens[a: a + size]))
        return parts


def ttt_mask(t: int, step: int, device) -> torch.Tensor:
    """Attention of step `step`'s queries [T] over the keys of steps 0..step [(step+1) * T]."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    blocks = [j <= i - step] + [j == i - step + s for s in range(1, step + 1)]
    return torch.cat(blocks, dim=1)  # [T, (step+1) T]


def safe_point_in_backward(x: torch.Tensor, between: Callable[[], None]) -> torch.Tensor:
    """x itself; backward calls `between()` when it reaches x's gradient."""
    return _SafePoint.apply(x, between)


class _SafePoint(torch.autograd.Function):
    """Identity whose backward calls `between()` first: a safe point inside backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, between: Callable[[], None]) -> torch.Tensor:
        ctx.between = between
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.between()
        return grad, None


def shift_left(x: torch.Tensor) -> torch.Tensor:
    """x[:, i+1] at position i, zeros at the end: [b, T, ...]."""
    return torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)


class EagleObjective:
    def __init__(self, head: EagleHead, target, data_layers: list[int], steps: int = 3,
                 reg_weight: float = 0.1, between: Callable[[], None] | None = None,
                 piece_rows: int = 128) -> None:
        cfg, tcfg = head.config, target.config
        where = {layer: k for k, layer in enumerate(data_layers)}
        needed = cfg.resolved_layers(tcfg.num_hidden_layers) + [tcfg.num_hidden_layers - 1]
        if any(layer not in where for layer in needed):
            raise BadInput(f"the distilled data holds layers {data_layers}; the head needs {needed}")
        self.head, self.target, self.steps, self.reg_weight = head, target, steps, reg_weight
        self.between, self.piece_rows = between, piece_rows
        self.h = tcfg.hidden_size
        self.last = where[tcfg.num_hidden_layers - 1]
        self.feature_slots = [where[layer] for layer in cfg.resolved_layers(tcfg.num_hidden_layers)]

    def _layer(self, feats: torch.Tensor, slot: int) -> torch.Tensor:
        return feats[..., slot * self.h: (slot + 1) * self.h]

    def _pieces(self, n: int) -> list[slice]:
        """Row ranges the LM-head parts run in: all at once without safe points."""
        size = n if self.between is None else self.piece_rows
        return [slice(i, min(n, i + size)) for i in range(0, n, max(1, size))]

    def _labels(self, normed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The target's distribution over the draft vocabulary at each row [..., Vd]."""
        flat = normed.reshape(-1, normed.shape[-1])
        out = []
        for rows in self._pieces(flat.shape[0]):
            if self.between is not None:
                self.between()
            out.append(F.linear(flat[rows], weight).float().softmax(-1))
        return torch.cat(out).reshape(*normed.shape[:-1], -1)

    def _cross_entropy(self, out: torch.Tensor, target_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy of the head's distribution at `out` [N, H] against `target_p`
        [N, Vd], and the rows where its argmax is the target's (bool [N])."""
        total, hits = out.new_zeros((), dtype=torch.float32), []
        for rows in self._pieces(out.shape[0]):
            x = out[rows]
            if self.between is not None:
                self.between()
                x = safe_point_in_backward(x, self.between)
            logq = self.head.logits(x, self.target.head_weight).float().log_softmax(-1)
            total = total - (target_p[rows] * logq).sum()
            hits.append(logq.detach().argmax(-1) == target_p[rows].argmax(-1))
        return total / out.shape[0], torch.cat(hits)

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        head, target, cfg = self.head, self.target, self.head.config
        b, t = batch.feats.shape[:2]
        device = batch.feats.device
        with torch.no_grad():
            feats = batch.feats.float()
            normed = target.model.norm(self._layer(feats, self.last))  # [b, T, H] final-normed states
            rows = head.draft_ids().to(device)
            probs = self._labels(normed, target.head_weight[rows])  # [b, T, Vd]
            labels = shift_left(probs)  # pair i is labelled by the target's distribution at i+1
            emb = target.model.embed_tokens(batch.ids[:, 1:])  # [b, T, H] token i+1 of pair i
            if cfg.style == "eagle1":
                feature = normed
            else:
                feature = torch.cat([self._layer(feats, s) for s in self.feature_slots], dim=-1)
            idx = torch.arange(t, device=device)
            answer = (idx[None] + 1 < batch.lengths[:, None]) & (idx[None] + 2 >= batch.prompt_lens[:, None])
        positions = idx.expand(b, t)
        x = head.stream_input(feature, emb, fused=True)
        reg_target = shift_left(normed if cfg.style == "eagle1" else x.detach())  # [b, T, H]
        keys, values, out = [], [], None
        total = torch.zeros((), device=device)
        metrics: dict[str, float] = {}
        for s in range(self.steps):
            if s > 0:
                fed = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)  # own output of position i-1
                x = head.stream_input(fed, emb, fused=False)
            q, k, v = head.project(x, emb, positions)
            keys.append(k)
            values.append(v)
            mask = ttt_mask(t, s, device)[None, None]
            out = head.finish(x, head.attend(q, torch.cat(keys, 2), torch.cat(values, 2), mask))  # [b, T, H]
            valid = answer & (idx[None] >= s)
            if not valid.any():
                continue
            target_p = labels[valid]
            ce, hits = self._cross_entropy(out[valid], target_p)
            reg = F.smooth_l1_loss(out[valid].float(), reg_target[valid].float())
            total = total + 0.8**s * (ce + self.reg_weight * reg)
            if s == 0 or s == self.steps - 1:
                metrics[f"ce{s}"] = float(ce.detach())
                metrics[f"acc{s}"] = float(hits.float().mean())
            if s == 0:
                metrics["reg0"] = float(reg.detach())
        return total, metrics
