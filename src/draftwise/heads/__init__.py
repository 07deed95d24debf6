"""Speculation heads trained with draftwise and shipped with it, loaded by short name.

Each head is a folder here holding `config.json`, `model.safetensors` and its card
(`README.md`: how, on what and for how long it was trained, and what it measured).
`--speculator eagle --draft-model smollm2-135m-eagle` finds it without a path. The sha256
of each weights file is written here, and a shipped head whose file does not match it
(a truncated or damaged install) is refused with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent


@dataclass(frozen=True)
class ShippedHead:
    name: str
    method: str  # the speculator that loads it
    target: str  # the bundled model it was trained for
    description: str
    sha256: str  # of model.safetensors

    @property
    def path(self) -> Path:
        return HERE / self.name


SHIPPED: dict[str, ShippedHead] = {
    h.name: h
    for h in [
        ShippedHead("smollm2-135m-eagle", "eagle", "smollm2-135m",
                    "EAGLE-3-style head (1 layer, 8k draft vocabulary) for smollm2-135m",
                    "7eed206e985d216c832f640fdf41ad629d37b46f282c2c777a87c8f59211a341"),
        ShippedHead("qwen2.5-coder-1.5b-eagle", "eagle", "qwen2.5-coder-1.5b",
                    "EAGLE-3 head (1 layer, MLP 2048, 8k draft vocabulary, int8 weights) for qwen2.5-coder-1.5b",
                    "853a91ba58ea2460c8f997edf8a416b30b27b3f2d5a411dde763dd13c43ddea1"),
    ]
}


def check_file(head: ShippedHead) -> str | None:
    """Why the shipped head's weights cannot be used (missing, or not the file shipped), else None."""
    import hashlib

    path = head.path / "model.safetensors"
    if not path.is_file():
        return f"shipped head {head.name}: {path} is missing; reinstall draftwise"
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != head.sha256:
        return f"shipped head {head.name}: {path} is damaged (sha256 does not match); reinstall draftwise"
    return None


def resolve(ref: str | Path) -> Path:
    """The folder of a shipped head given its name; any other reference as a path."""
    head = SHIPPED.get(str(ref))
    return head.path if head is not None else Path(ref).expanduser()
