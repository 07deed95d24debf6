"""The adaptive speculator's saved state (`--adaptive-state DIR`): what it learned survives a restart.

Layout of DIR:
- `state.json`: which target it was learned on, the folder of the newest head, the
  arbiter's estimates (`Arbiter.state`) and the learner's counters;
- `head-N-PID/`: a learned head in our layout (`save_eagle_head`, bf16 weights).

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
import os
import shutil
from pathlib import Path
from typing import Any

from draftwise.errors import BadInput
from draftwise.speculators.eagle_checkpoint import load_eagle_head, save_eagle_head
from draftwise.speculators.eagle_head import EagleHead

STATE = "state.json"


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
        self.written: list[str] = [self.saved["head"]] if self.saved else []  # heads this process may remove

    def _read(self) -> dict[str, Any] | None:
        path = self.folder / STATE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("head"), str):
                raise ValueError("no head folder named")
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise BadInput(f"--adaptive-state {self.folder}: {STATE} is damaged ({e}); remove the folder "
                           f"to start afresh") from None
        if data.get("target") not in (None, self.target_name):
            raise BadInput(f"--adaptive-state {self.folder} was learned on {data['target']}, not {self.target_name}")
        return data

    def load_head(self, target) -> EagleHead | None:
        """The saved head, checked against the target (None when nothing was saved yet)."""
        if self.saved is None:
            return None
        folder = self.folder / self.saved["head"]
        try:
            return load_eagle_head(folder, target)
        except BadInput as e:
            raise BadInput(f"--adaptive-state {self.folder}: the saved head cannot be used: {e}") from None

    def save(self, head: EagleHead, arbiter: dict[str, Any], learner: dict[str, Any]) -> None:
        number = 1 + max([int(p.name.split("-")[1]) for p in self.folder.glob("head-*")
                          if p.name.split("-")[1].isdigit()] or [0])
        name = f"head-{number}-{os.getpid()}"
        save_eagle_head(head, self.folder / name, {"adaptive": learner}, "bf16")
        data = {"target": self.target_name, "head": name, "arbiter": arbiter, "learner": learner}
        tmp = self.folder / f"{STATE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.folder / STATE)
        self.saved = data
        current = json.loads((self.folder / STATE).read_text()).get("head")  # another process may have saved since
        for old in self.written:
            if old not in (name, current):
                shutil.rmtree(self.folder / old, ignore_errors=True)
        self.written = [name]
