"""Static KV cache: preallocated, one row per sequence, indexed by slot.

Keys and values of every layer live in one buffer `[layers, batch, kv_heads, capacity,
head_dim]`. Row b holds `lengths[b]` committed slots; a forward pass writes its new
tokens into the slots right after them without committing. Committing is just setting a
length, so a rejected draft costs nothing to discard: the next pass overwrites it. For
a tree step the accepted root-to-leaf path is kept by index copy (`keep_path`).

Slots are not positions: tree siblings share a position but each has its own slot.
The capacity is rounded up to whole key blocks of the attention (`BLOCK`, defined here
and read by models/attention.py).
"""

from __future__ import annotations

import torch


BLOCK = 64  # key positions per attention block (models/attention.py); caches hold whole blocks


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        capacity = -(-capacity // BLOCK) * BLOCK
        shape = (num_layers, batch_size, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # [batch]
        self.capacity = capacity

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor | None
    ) -> None:
        """Store new keys/values `[batch, kv_heads, T, head_dim]` at `slots` `[batch, T]` of
        cache `rows` `[batch]` (None: rows 0..batch-1)."""
        if rows is None:
            rows = torch.arange(k.shape[0], device=k.device)
        rows = rows[:, None]  # [batch, 1]
        # advanced indexing on dims (batch, slot) moves them first: value is [batch, T, heads, dim]
        self.k[layer][rows, :, slots] = k.transpose(1, 2)
        self.v[layer][rows, :, slots] = v.transpose(1, 2)

    def layer(self, layer: int, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first `upto` slots: `[batch, kv_heads, upto, head_dim]`."""
        return self.k[layer, :, :, :upto], self.v[layer, :, :, :upto]

    # --- commit / rollback -------------------------------------------------------------

    def set_length(self, row: int, length: int) -> None:
        """Commit (or roll back to) `length` slots of `row`."""
        if not 0 <= length <= self.capacity:
            raise ValueError(f"length {length} outside [0, {self.capacity}]")
        self.lengths[row] = length

    def keep_path(self, row: int, start: int, path_slots: list[int]) -> None:
        """Keep the tree nodes at `path_slots` as the slots `start, start+1, ...` of `row`,
        then commit them: the index copy that turns an accepted tree path into a chain."""
        n = len(path_slots)
        expected = list(range(start, start + n))
        if path_slots != expected:
            src = torch.tensor(path_slots, device=self.k.device)
            dst = torch.tensor(expected, device=self.k.device)
            self.k[:, row, :, dst] = self.k[:, row, :, src]
            self.v[:, row, :, dst] = self.v[:, row, :, src]
        self.set_length(row, start + n)

    def reset_row(self, row: int) -> None:
        self.lengths[row] = 0
