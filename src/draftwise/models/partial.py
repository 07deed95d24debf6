"""Running part of a model: any stack of decoder layers with the native model's machinery
(explicit cache slots and lengths, RoPE, masks), its final norm and LM head. The drafters
that reuse the target's own layers or blocks shaped like them (layer_skip, mtp) run on these.
"""

from __future__ import annotations

from typing import Sequence

import torch

from draftwise.cache import KVCache
from draftwise.models.transformer import StepInputs, Transformer, step_inputs


def partial_inputs(
    model: Transformer, positions: torch.Tensor, cache: KVCache, lengths: torch.Tensor, rows: torch.Tensor,
) -> StepInputs:
    """Per-pass inputs for new tokens written at slots `lengths + 0..T-1` of cache `rows`,
    each seeing the row's first `lengths` slots and the new tokens before it (causal).

    positions [b, T] (RoPE positions), lengths [b], rows [b]. Attention in the C kernel
    where the model runs its own there (on the CPU)."""
    return step_inputs(model.inv_freq, positions, cache, lengths, rows, kernel=model.attention_in_kernel())


@torch.inference_mode()
def run_layers(layers: Sequence[torch.nn.Module], x: torch.Tensor, step: StepInputs) -> torch.Tensor:
    """x [b, T, hidden] through `layers` in order; returns [b, T, hidden]."""
    for layer in layers:
        x = layer(x, step)
    return x


@torch.inference_mode()
def lm_logits(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    """The model's final norm and LM head: [..., hidden] -> [..., vocab]."""
    return model.head(model.model.norm(x))


def padded_groups(starts: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Which rows to run in one padded pass: every row writes max(lengths) slots after
    its start, so a long new prompt next to a row deep into its context could run past
    the cache; then each row runs alone."""
    if max(starts) + max(lengths) <= capacity:
        return [list(range(len(starts)))]
    return [[j] for j in range(len(starts))]
