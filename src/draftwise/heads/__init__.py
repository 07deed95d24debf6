"""Speculation heads trained with draftwise and shipped with it, loaded by short name.

Each head is a folder here holding `config.json`, `model.safetensors` and its card
(`README.md`: how, on what and for how long it was trained, and what it measured).
`--speculator eagle --draft-model smollm2-135m-eagle` finds it without a path.
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

    @property
    def path(self) -> Path:
        return HERE / self.name


SHIPPED: dict[str, ShippedHead] = {
    h.name: h
    for h in [
        ShippedHead("smollm2-135m-eagle", "eagle", "smollm2-135m",
                    "EAGLE-3-style head (1 layer, 8k draft vocabulary) for smollm2-135m"),
    ]
}


def resolve(ref: str | Path) -> Path:
    """The folder of a shipped head given its name; any other reference as a path."""
    head = SHIPPED.get(str(ref))
    return head.path if head is not None else Path(ref).expanduser()
