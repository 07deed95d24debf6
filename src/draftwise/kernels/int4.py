"""4-bit group rounding shared by the int4 (torch) and w4a8 (draftwise's C kernel) weights."""

from __future__ import annotations

import torch


def int4_groups(weight: torch.Tensor, group: int, dtype: torch.dtype = torch.float32,
                smallest: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight `[n, k]` -> (4-bit values 0..15 uint8 `[n, k/group, group]`, scale and low
    `[n, k/group]` in `dtype`): asymmetric, each group's min to max in 15 steps (scale at
    least `smallest`), the values rounded against the scale and low as stored in `dtype`."""
    g = weight.float().reshape(weight.shape[0], -1, group)
    low = g.amin(-1).to(dtype)
    scale = ((g.amax(-1) - low.float()) / 15).clamp(min=smallest).to(dtype)
    q = torch.round((g - low.float()[..., None]) / scale.float()[..., None]).clamp(0, 15).to(torch.uint8)
    return q, scale, low
