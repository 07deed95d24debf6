"""Self-distillation data: the target answers the prompts, its hidden states become labels.

Prompts come from a JSONL file, one object per line with "prompt" (a string, wrapped in
the chat template when the tokenizer has one, unless chat=False) or "messages" (a chat
list). The target answers each greedily with draftwise's own engine; a recording
proposer (it proposes nothing) receives the hidden states the engine reports for every
token the target ran, so the labels cost no extra target pass.

Stored per sequence, in shards `data/shard_NNNNN.safetensors`:
- `ids` int32: prompt + answer tokens, concatenated over the shard's sequences;
- `feats` bf16 [tokens, len(layers) * H]: outputs of the target layers in `meta.json`
  (`layers`, native numbering; the last one is the final layer before its norm), for the
  tokens the target ran (all but the last one or two of each sequence);
- `ids_offsets`, `feat_offsets` int64 [n + 1] and `prompt_lens` int64 [n].
The target's next-token distributions are not stored: they are the target's LM head over
the stored final-layer state, recomputed exactly when training.
`meta.json` records progress (`prompts_done`), so an interrupted run resumes by shard: a
shard is written whole before `meta.json` names it, and `meta.json` is replaced in one
rename, so a run killed at any moment loses at most the shard it was answering.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from draftwise.errors import BadInput
from draftwise.speculators.base import Draft, Proposer

SHARD_SEQUENCES = 64  # at least; a shard holds 4 engine batches so few rows idle at its end


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The prompt objects of a JSONL file; BadInput names the first bad line."""
    items = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}:{n}: not JSON ({e})") from None
        ok = isinstance(obj, dict) and (isinstance(obj.get("prompt"), str) or isinstance(obj.get("messages"), list))
        if not ok:
            raise BadInput(f'{path}:{n}: expected an object with "prompt" (string) or "messages" (list)')
        items.append(obj)
    if not items:
        raise BadInput(f"{path} holds no prompts")
    return items


def encode_prompt(item: dict[str, Any], tokenizer, chat: bool = True, max_prompt_tokens: int = 512) -> list[int]:
    """Token ids of one prompt object (the last max_prompt_tokens of them)."""
    template = getattr(tokenizer, "chat_template", None)
    if "messages" in item:
        if not template:
            raise BadInput("chat prompts need a tokenizer with a chat template")
        messages = item["messages"]
    elif chat and template:
        messages = [{"role": "user", "content": item["prompt"]}]
    else:
        return tokenizer.encode(item["prompt"])[-max_prompt_tokens:]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)[-max_prompt_tokens:]


class Recorder(Proposer):
    """Proposes nothing; keeps the target hidden states of every request's tokens."""

    name = "_recorder"

    def __init__(self, layers: Sequence[int]) -> None:
        self.layers = list(layers)
        self.hidden_layers = tuple(sorted(set(self.layers)))
        self.feats: dict[str, list[torch.Tensor]] = {}
        self.finished: list[tuple[list[int], int, torch.Tensor]] = []  # (ids, prompt_len, feats)

    def begin(self, request) -> None:
        self.feats[request.request_id] = []

    def on_hidden(self, request, hidden: dict[int, torch.Tensor]) -> None:
        row = torch.cat([hidden[i] for i in self.layers], dim=-1)  # [n, len(layers) * H]
        self.feats[request.request_id].append(row.to(torch.bfloat16).cpu())

    def propose(self, requests, num_tokens) -> Draft:
        return Draft.empty(len(requests))

    def end(self, request) -> None:
        feats = torch.cat(self.feats.pop(request.request_id))
        n = feats.shape[0]
        self.finished.append((request.all_ids[: n + 1], len(request.prompt_ids), feats))


def distill_layers(num_layers: int) -> list[int]:
    """What the data keeps: EAGLE-3's three capture points and the last layer."""
    from draftwise.speculators.eagle import default_eagle3_layers

    return sorted(set(default_eagle3_layers(num_layers)) | {num_layers - 1})


def build_dataset(target, tokenizer, prompts: list[dict[str, Any]], folder: str | Path, *, max_tokens: int = 256,
                  batch_size: int = 8, chat: bool = True, progress: bool = True) -> dict[str, Any]:
    """Answer the prompts with the target and store the labels under `folder` (resumable)."""
    from safetensors.torch import save_file

    from draftwise.engine.engine import Engine
    from draftwise.sampling import SamplingParams

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / "meta.json"
    cfg = target.config
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {
        "layers": distill_layers(cfg.num_hidden_layers), "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size, "max_tokens": max_tokens,
        "prompts_total": len(prompts), "prompts_done": 0, "shards": [], "sequences": 0, "tokens": 0,
    }
    if meta["hidden_size"] != cfg.hidden_size or meta["num_hidden_layers"] != cfg.num_hidden_layers:
        raise BadInput(f"{folder} holds data of another target model; use a new --out folder")
    if meta["prompts_total"] < len(prompts):  # fewer (a --limit prefix) is fine
        raise BadInput(f"{folder} holds data for {meta['prompts_total']} prompts, not these {len(prompts)}; "
                       "use a new --out folder")
    encoded = [encode_prompt(p, tokenizer, chat) for p in prompts]
    max_len = max(len(e) for e in encoded) + max_tokens + 1
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    bar = tqdm(total=len(prompts), initial=meta["prompts_done"], desc="self-distillation", unit="prompt",
               disable=not progress)
    while meta["prompts_done"] < len(prompts):
        t0 = time.perf_counter()
        start = meta["prompts_done"]
        chunk = encoded[start: start + max(SHARD_SEQUENCES, 4 * batch_size)]
        recorder = Recorder(meta["layers"])
        engine = Engine(target, tokenizer, proposer=recorder, max_batch_size=batch_size, max_model_len=max_len)
        for ids in chunk:
            engine.add_request(ids, params)
        while engine.has_work:
            done = sum(o.finished for o in engine.step())
            bar.update(done)
        seqs = [s for s in recorder.finished if s[2].shape[0] >= 2]
        if seqs:
            shard = f"shard_{len(meta['shards']):05d}.safetensors"
            save_file(pack(seqs), str(folder / shard))
            meta["shards"].append(shard)
        meta["prompts_done"] = start + len(chunk)
        meta["sequences"] += len(seqs)
        meta["tokens"] += sum(s[2].shape[0] for s in seqs)
        meta["seconds"] = round(meta.get("seconds", 0.0) + time.perf_counter() - t0, 1)
        tmp = meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(meta_path)
    bar.close()
    return meta


def pack(seqs: list[tuple[list[int], int, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Sequences (ids, prompt_len, feats) -> the flat tensors of one shard."""
    ids_len = [len(s[0]) for s in seqs]
    feat_len = [s[2].shape[0] for s in seqs]
    zero = torch.zeros(1, dtype=torch.long)
    return {
        "ids": torch.tensor([t for s in seqs for t in s[0]], dtype=torch.int32),
        "feats": torch.cat([s[2] for s in seqs]).contiguous(),
        "ids_offsets": torch.cat([zero, torch.tensor(ids_len).cumsum(0)]),
        "feat_offsets": torch.cat([zero, torch.tensor(feat_len).cumsum(0)]),
        "prompt_lens": torch.tensor([s[1] for s in seqs], dtype=torch.long),
    }
