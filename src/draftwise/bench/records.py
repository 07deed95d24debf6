"""Per-generation records in `<out>/records.jsonl`, written as they finish, so that a run
interrupted at any point resumes where it stopped.

One record per (question_id, turn, method). `<out>/run.json` holds the settings the
records were measured under; resuming with different settings is refused rather than
silently mixing numbers from two setups.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from draftwise.errors import BadInput

RECORDS = "records.jsonl"
RUN = "run.json"

Key = tuple[str, int, str]  # (question_id as text, turn index from 0, method label)


def key_of(question_id: Any, turn: int, method: str) -> Key:
    return (str(question_id), int(turn), method)


def same_config(a: dict | None, b: dict | None) -> bool:
    """Equal speculative configs, defaults filled in (a field added since is not a change)."""
    if a is None or b is None:
        return a is b
    from pydantic import ValidationError

    from draftwise.config import SpeculativeConfig

    try:
        return SpeculativeConfig.model_validate(a) == SpeculativeConfig.model_validate(b)
    except ValidationError:
        return False


class RecordStore:
    """The records of one output folder: those already there, and new ones appended."""

    def __init__(self, out_dir: str | Path, settings: dict[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / RECORDS
        self._check_settings(settings)
        self.records: dict[Key, dict] = {}
        if self.path.is_file():
            self._load()

    def _check_settings(self, settings: dict[str, Any]) -> None:
        run = self.out_dir / RUN
        if run.is_file() and self.path.is_file():
            try:
                before = json.loads(run.read_text())
            except json.JSONDecodeError:
                before = None
            if before is not None and before != settings:
                diff = [f"{k}: {before.get(k)!r} -> {settings.get(k)!r}"
                        for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)]
                raise BadInput(f"{self.out_dir} holds results measured with other settings ({'; '.join(diff)}); "
                               "use another --out folder or delete it")
        run.write_text(json.dumps(settings, indent=2) + "\n")

    def _load(self) -> None:
        text = self.path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self.records[key_of(rec["question_id"], rec["turn"], rec["method"])] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                if number < len(lines):
                    raise BadInput(f"{self.path} line {number} is damaged; delete that line or the file") from None
                lines.pop()  # cut short by the interruption: drop it, that generation is redone
                text = ""
        if text and text.endswith("\n"):
            return
        self.path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    def check_method(self, label: str, config: dict | None) -> None:
        """Refuse to resume a label whose recorded config differs from the one asked now."""
        for (_, _, method), rec in self.records.items():
            if method == label and not same_config(rec.get("config"), config):
                raise BadInput(f"{self.path}: method {label} was recorded with config {rec.get('config')}, "
                               f"now {config}; use another --out folder")
            if method == label:
                return

    def get(self, question_id: Any, turn: int, method: str) -> dict | None:
        return self.records.get(key_of(question_id, turn, method))

    def add(self, record: dict) -> None:
        self.records[key_of(record["question_id"], record["turn"], record["method"])] = record
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def all(self) -> list[dict]:
        return list(self.records.values())
