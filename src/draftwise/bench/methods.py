"""What a benchmark compares: plain decoding, speculators given as SPECs, and peer engines.

A SPEC is a method name (`ngram`) or a JSON speculative config
(`{"method": "draft_model", "model": "qwen2.5-coder-0.5b"}`). Each gets a short label used
in tables, plots and the records file; settings that differ from the defaults show in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from draftwise.config import SpeculativeConfig, parse_speculative_config
from draftwise.errors import BadInput

PLAIN = "plain"
SHORT = {"num_speculative_tokens": "k", "draft_quantization": "draft_q"}  # shorter names of settings shown in labels
PEERS = ("hf", "hf-assisted", "hf-lookup", "llamacpp", "llamacpp-lookup")


@dataclass(frozen=True)
class Method:
    label: str
    config: SpeculativeConfig | None = None  # None: plain decoding (or a peer)
    peer: str | None = None  # one of PEERS for another engine

    @property
    def kind(self) -> str:
        return "peer" if self.peer else "draftwise"

    def config_dict(self) -> dict | None:
        return self.config.model_dump(mode="json") if self.config else None


def parse_method(spec: str) -> Method:
    """A SPEC (method name or JSON config) -> Method; `plain`/`none` is plain decoding."""
    text = spec.strip()
    if text.lower() in (PLAIN, "none"):
        return Method(PLAIN)
    raw = text if text.startswith("{") else {"method": text}
    config = parse_speculative_config(raw)
    assert config is not None
    if config.method == "draft_model" and not config.model:  # caught here, not after the methods before it ran
        raise BadInput('speculator draft_model needs its draft model: --speculator '
                       '\'{"method": "draft_model", "model": "NAME|PATH"}\'')
    return Method(label_of(config), config)


def label_of(config: SpeculativeConfig) -> str:
    """`ngram`, `draft_model:qwen2.5-coder-0.5b`, `ngram(k=8, adaptive=false)`, ..."""
    label = config.method
    if config.model:
        label += ":" + Path(config.model).name
    defaults = SpeculativeConfig(method=config.method).model_dump()
    changed = [f"{SHORT.get(k, k)}={str(v).lower() if isinstance(v, bool) else v}"
               for k, v in config.model_dump().items() if k not in ("method", "model") and v != defaults[k]]
    return label + (f"({', '.join(changed)})" if changed else "")


def parse_methods(specs: Sequence[str], peers: Sequence[str] = ()) -> list[Method]:
    """Plain first (the baseline), then each speculator, then each peer; labels made unique."""
    methods = [Method(PLAIN)]
    labels = {PLAIN}
    for spec in specs:
        m = parse_method(spec)
        if m.label == PLAIN:
            continue  # always measured
        label, n = m.label, 2
        while label in labels:
            label, n = f"{m.label}#{n}", n + 1
        labels.add(label)
        methods.append(Method(label, m.config))
    for peer in peers:
        if peer not in PEERS:
            raise BadInput(f"unknown peer {peer!r}; choose from: {', '.join(PEERS)}")
        if peer not in labels:
            labels.add(peer)
            methods.append(Method(peer, peer=peer))
    return methods
