"""The adaptive speculator's saved state (`--adaptive-state DIR`): what it learned survives a restart.

Layout of DIR:
- `state.json`: which target it was learned on, the folder of the newest head (null
  before the first training step), the arbiter's estimates (`Arbiter.state`, now and as
  at the state's first save) and the learner's counters (steps, first and last loss,
  requests and tokens learned from);
- `head-N-PID/`: a learned head in our layout (`save_eagle_head`, bf16 weights);
- `traffic.safetensors`: the replay buffer, the served requests the learner trains on
  (tokens, prompt lengths and the target's features, bf16), as bounded as the buffer
  (`buffer_tokens`, oldest out). Written atomically (a temporary file, renamed); a store
  that cannot be read is set aside with one warning line and the learner starts with no
  stored traffic, nothing else lost.

A save writes the new head folder first, then replaces `state.json` atomically (write to
a temporary file, rename), then removes the head folders this process wrote before and the
one it started from: a save cut short leaves the previous state readable. Several
processes may save to one folder (Ray Serve replicas sharing one learner): head folders
and temporary files carry the process id, and a process never removes a head another
one wrote, so `state.json` always names a complete head (the newest save wins). A folder
that cannot be written is refused at start; a `state.json` that cannot be read is refused
with the reason, never half-used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from draftwise.errors import BadInput
from draftwise.speculators.adaptive.online import Stored
from draftwise.speculators.eagle import EagleHead, load_eagle_head, save_eagle_head

STATE = "state.json"
TRAFFIC = "traffic.safetensors"
log = logging.getLogger("draftwise.adaptive")


def read_state(folder: Path, flag: str = "--adaptive-state") -> dict[str, Any] | None:
    """DIR/state.json, read without touching the folder (None when there is none); a
    damaged one is refused with the reason, naming the option (`flag`) that gave DIR."""
    path = folder / STATE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("head", ""), (str, type(None))):
            raise ValueError("no head folder named")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise BadInput(f"{flag} {folder}: {STATE} is damaged ({e}); remove the folder to start afresh") from None
    return data


class AdaptiveState:
    def __init__(self, folder: str | Path, target_name: str) -> None:
        self.folder = Path(folder).expanduser()
        self.target_name = target_name
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise BadInput(f"--adaptive-state {folder}: cannot write there ({e.strerror or e})") from None
        self.saved = self._read()
        self.written: list[str] = [self.saved["head"]] if self.saved and self.saved.get("head") else []  # may remove

    def _read(self) -> dict[str, Any] | None:
        data = read_state(self.folder)
        if data is None:
            return None
        if data.get("target") not in (None, self.target_name):
            raise BadInput(f"--adaptive-state {self.folder} was learned on {data['target']}, not {self.target_name}")
        return data

    def load_head(self, target) -> EagleHead | None:
        """The saved head, checked against the target (None when nothing was saved yet)."""
        if self.saved is None or not self.saved.get("head"):
            return None
        folder = self.folder / self.saved["head"]
        try:
            return load_eagle_head(folder, target)
        except BadInput as e:
            raise BadInput(f"--adaptive-state {self.folder}: the saved head cannot be used: {e}") from None

    def save(self, head: EagleHead | None, arbiter: dict[str, Any], learner: dict[str, Any]) -> None:
        """A new head (None: no training step yet, the saved one stays), the arbiter and the
        learner's counters; see the module docstring for the order of the writes."""
        if head is None:
            name = (self.saved or {}).get("head")
        else:
            number = 1 + max([int(p.name.split("-")[1]) for p in self.folder.glob("head-*")
                              if p.name.split("-")[1].isdigit()] or [0])
            name = f"head-{number}-{os.getpid()}"
            save_eagle_head(head, self.folder / name, {"adaptive": learner}, "bf16")
        first = (self.saved or {}).get("arbiter_first", arbiter)  # the estimates of the state's first save
        data = {"target": self.target_name, "head": name, "arbiter": arbiter, "arbiter_first": first,
                "learner": learner}
        tmp = self.folder / f"{STATE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.folder / STATE)
        self.saved = data
        current = json.loads((self.folder / STATE).read_text()).get("head")  # another process may have saved since
        for old in self.written:
            if old not in (name, current):
                shutil.rmtree(self.folder / old, ignore_errors=True)
        self.written = [name] if name else []

    def save_traffic(self, items: Sequence[Stored]) -> None:
        """The replay buffer's sequences, replacing the stored ones atomically."""
        if not items:
            return
        tensors = {
            "ids": torch.cat([it.ids.to(torch.int32) for it in items]),
            "feats": torch.cat([it.feats.to(torch.bfloat16) for it in items]).contiguous(),
            "lengths": torch.tensor([it.feats.shape[0] for it in items], dtype=torch.int64),
            "prompt_lens": torch.tensor([it.prompt_len for it in items], dtype=torch.int64),
        }
        tmp = self.folder / f"{TRAFFIC}.{os.getpid()}.tmp"
        save_file(tensors, str(tmp), {"target": self.target_name})
        tmp.replace(self.folder / TRAFFIC)

    def traffic_summary(self) -> dict[str, int]:
        """Sequences, tokens and bytes of the stored traffic (the file's lengths only)."""
        path = self.folder / TRAFFIC
        if not path.exists():
            return {"sequences": 0, "tokens": 0, "bytes": 0}
        try:
            with safe_open(str(path), "pt") as f:  # the lengths alone, not the features
                lengths = f.get_tensor("lengths")
        except (OSError, SafetensorError, KeyError) as e:
            raise BadInput(f"{path} cannot be read ({e})") from None
        return {"sequences": len(lengths), "tokens": int(lengths.sum()), "bytes": path.stat().st_size}

    def load_traffic(self, width: int) -> list[Stored]:
        """The stored sequences (oldest first) whose features are `width` wide; [] when none
        were stored or the store cannot be used (one warning, the file set aside)."""
        path = self.folder / TRAFFIC
        if not path.exists():
            return []
        try:
            t = load_file(str(path))
            ids, feats, lengths, prompt_lens = t["ids"], t["feats"], t["lengths"].tolist(), t["prompt_lens"].tolist()
            if feats.dim() != 2 or feats.shape[1] != width:
                raise ValueError(f"features {tuple(feats.shape)} do not fit this head ({width} wide)")
            if sum(lengths) != feats.shape[0] or sum(lengths) + len(lengths) != ids.shape[0] \
                    or len(prompt_lens) != len(lengths) or min(lengths, default=1) < 1:
                raise ValueError("its parts do not add up")
        except (OSError, SafetensorError, KeyError, ValueError, RuntimeError) as e:
            aside = path.with_name(f"{TRAFFIC}.damaged")
            path.replace(aside)
            log.warning("adaptive: %s cannot be used (%s); set aside as %s, starting with no stored traffic",
                        path, e, aside.name)
            return []
        out, a, b = [], 0, 0
        for n, p in zip(lengths, prompt_lens):
            out.append(Stored(ids[b: b + n + 1].to(torch.int64), feats[a: a + n], int(p)))
            a, b = a + n, b + n + 1
        return out
