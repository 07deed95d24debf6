"""Reading self-distillation shards back as training batches.

A training item is a window of at most `max_len` target-run tokens of one sequence
(long sequences give several windows). Batches are padded on the right; their order
is a function of (seed, epoch) only, so a resumed run sees the same batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from draftwise.errors import BadInput
from draftwise.speculators.eagle import Batch


def read_meta(folder: Path) -> dict:
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        raise BadInput(f"{folder} holds no distilled data (no meta.json)")
    return json.loads(meta_path.read_text())


class Distilled:
    """The shards of one `build_dataset` folder, opened lazily (memory-mapped); `also`: more
    folders distilled from the same target (earlier runs' data), read as one data set."""

    def __init__(self, folder: str | Path, max_len: int = 512, also: list[str | Path] = ()) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self.layers: list[int] = self.meta["layers"]
        self.handles = [safe_open(str(self.folder / s), framework="pt") for s in self.meta["shards"]]
        for extra in map(Path, also):
            meta = read_meta(extra)
            if (meta["layers"], meta["hidden_size"], meta["vocab_size"]) != (
                    self.layers, self.meta["hidden_size"], self.meta["vocab_size"]):
                raise BadInput(f"{extra} was distilled from another target or other layers than {self.folder} "
                               f"(layers {meta['layers']} vs {self.layers}, hidden size {meta['hidden_size']} vs "
                               f"{self.meta['hidden_size']})")
            self.handles += [safe_open(str(extra / s), framework="pt") for s in meta["shards"]]
        self.items: list[tuple[int, int, int, int, int]] = []  # shard, ids start, feat start, n, prompt_len
        for k, h in enumerate(self.handles):
            ids_off = h.get_tensor("ids_offsets").tolist()
            feat_off = h.get_tensor("feat_offsets").tolist()
            prompt_lens = h.get_tensor("prompt_lens").tolist()
            for j, p in enumerate(prompt_lens):
                n = feat_off[j + 1] - feat_off[j]
                for a in range(0, max(n - 1, 1), max_len):
                    self.items.append((k, ids_off[j] + a, feat_off[j] + a, min(max_len, n - a), p - a))
        if not self.items:
            raise BadInput(f"{folder} holds no sequences")

    def __len__(self) -> int:
        return len(self.items)

    def token_counts(self, vocab: int) -> torch.Tensor:
        """How often each token occurs in the data [vocab] (answers and prompts)."""
        counts = torch.zeros(vocab, dtype=torch.long)
        for h in self.handles:
            counts += torch.bincount(h.get_tensor("ids").long(), minlength=vocab)[:vocab]
        return counts

    def item(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        k, ia, fa, n, p = self.items[index]
        h = self.handles[k]
        return h.get_slice("ids")[ia: ia + n + 1].long(), h.get_slice("feats")[fa: fa + n], p

    def epoch_batches(self, seed: int, epoch: int, batch_size: int) -> list[list[int]]:
        """Item indices per batch: shuffled, then length-sorted inside blocks to cut padding."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.items), generator=g).tolist()
        block = batch_size * 32
        batches = []
        for b in range(0, len(order), block):
            chunk = sorted(order[b: b + block], key=lambda i: self.items[i][3])
            batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
        perm = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in perm]

    def collate(self, indices: list[int]) -> Batch:
        return Batch.of_windows([self.item(i) for i in indices])
