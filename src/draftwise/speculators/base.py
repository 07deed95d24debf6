"""The one interface every speculation method implements, and the registry of methods.

A proposer guesses the next tokens of each running request cheaply; the engine verifies
all guesses in one target pass (see `draftwise.verify`). A proposer never touches the
target's KV cache: rollback lives there, not here.

Lifecycle per request: `begin` once, then per step `propose` and, after verification,
`on_accept` with how many draft tokens were accepted; `end` when the request finishes.
Once per engine: `attach_target_cache` before any request, `close` at shutdown. Between
them, `pause` and `resume` hold and release the method's background work (the bench holds
every method but the one it times).

Replicas behind one endpoint (server/ray_serve.py) pool what their methods learn from
traffic through three hooks, no-ops by default: `share` once (what the method will pool),
then, every exchange, `take_shared` (what this replica learned since the last one) and
`adopt` (what the others learned). `report` gives the method's counters for metrics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import torch

from draftwise.config import SpeculativeConfig
from draftwise.request import RequestState


@dataclass
class Draft:
    """Proposed tokens for each request of a batch.

    tokens[i]:  the draft of request i; a chain, or the nodes of a tree listed so that a
                parent always comes before its children. May be empty.
    parents[i]: None for a chain; for a tree, the parent index of each node, -1 for a
                child of the root (the root is the last committed token).
    probs[i]:   None for a point-mass draft (lookup methods: q = 1 on the proposed token);
                else [len(tokens[i]), vocab]: the draft distribution each token was
                sampled from (row j is the distribution at node j's parent).
    prefill_seconds: time this call spent prefilling prompts into a draft model's cache
                (once per request, not per draft); the controller leaves it out of the
                cost of drafting.
    scores:     None, or the method's own rating of each draft: the number of its tokens
                it expects the target to accept (the suffix cache, from its counts).
    """

    tokens: list[list[int]]
    parents: list[list[int] | None]
    probs: list[torch.Tensor | None]
    prefill_seconds: float = 0.0
    scores: list[float] | None = None

    @classmethod
    def empty(cls, n: int) -> "Draft":
        return cls(tokens=[[] for _ in range(n)], parents=[None] * n, probs=[None] * n)


@dataclass
class Sharing:
    """What a method pools with the other replicas once `Proposer.share` was called.

    sequences: finished requests' tokens go out (`Learned.sequences`) and the other
               replicas' come in (`Proposer.adopt`): a lookup cache learns from them (suffix).
    learner:   the spec of the method's head learner (`OnlineLearner.spec`, adaptive), from
               which one shared learner is built to train for every replica
               (server/ray_learner.py); None when the method trains no head.
    """

    sequences: bool = False
    learner: dict | None = None


@dataclass
class Learned:
    """What a replica's method took from its traffic since it was last asked (`take_shared`).

    sequences: finished requests' token ids, prompt then output.
    examples:  finished requests' training examples for the shared learner, each
               (ids [n+1], target features [n, F] bf16, prompt length).
    """

    sequences: list[list[int]] = field(default_factory=list)
    examples: list[tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=list)


class Proposer(ABC):
    """Base class of all speculation methods."""

    name: ClassVar[str]
    # num_speculative_tokens counts the nodes of a token tree (eagle, medusa, adaptive), not a
    # chain's length: the engine then picks a node budget per step (engine/tree_controller.py)
    drafts_trees: ClassVar[bool] = False
    # target layers whose outputs this proposer reads (-1 = last layer, before the final
    # norm); the engine then calls `on_hidden` after every target pass
    hidden_layers: tuple[int, ...] = ()

    @classmethod
    def max_tree_depth(cls, config: SpeculativeConfig) -> int | None:
        """For a method that drafts trees: the depth of the deepest path its trees can have
        under `config`, i.e. the most draft tokens one step can accept; None when only the
        node budget bounds it. The engine's controller reads it from the class, with
        `drafts_trees`, to pick and size itself (`engine/controller.py`'s `make_controller`)."""
        return None

    @classmethod
    def from_config(cls, config: SpeculativeConfig, target: "Target") -> "Proposer":
        """Build the method from its config for `target` (how `build_proposer` makes every
        registered method); BadInput (one line) on what cannot work."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from a speculative config")

    def attach_target_cache(self, cache) -> None:
        """The engine hands over its target KV cache once, before any request; a proposer
        that runs the target's own first layers (layer_skip) may share it."""

    def begin(self, request: RequestState) -> None:
        """A request starts (its prompt is prefilled in the target)."""

    @abstractmethod
    def propose(self, requests: Sequence[RequestState], num_tokens: Sequence[int]) -> Draft:
        """Propose up to num_tokens[i] tokens (a chain, or a tree of that many nodes) per request."""

    def on_accept(self, request: RequestState, num_accepted: int) -> None:
        """After verification: `num_accepted` draft tokens were kept, and the tokens now
        committed are in `request.output_ids` (including the bonus / recovered token)."""

    def on_hidden(self, request: RequestState, hidden: dict[int, torch.Tensor]) -> None:
        """Target hidden states `{layer: [n, hidden_size]}` of the tokens this pass added to
        the cache, in order: after prefill, the n prompt tokens; after a step, the fed last
        token and then the accepted draft tokens. Called before `on_accept`."""

    def end(self, request: RequestState) -> None:
        """The request finished; drop any per-request state."""

    def close(self) -> None:
        """The engine shuts down: stop background work, save what must survive a restart."""

    def pause(self) -> None:
        """Hold background work (a learner's training) until `resume`; returns once none
        runs. The bench calls it while another method is timed, so no method's work runs on
        another's clock. None by default."""

    def resume(self) -> None:
        """Let background work go on after `pause`."""

    def request_arrived(self) -> None:
        """A request was just queued, before its prefill (the engine's `add_request`): a
        method whose background work runs only while the engine is idle stops it at its next
        safe point, so the request has the cores. None by default."""

    def engine_idle(self) -> None:
        """The engine holds no request, waiting or running (after the step that finished the
        last one, or an abort): from an arrival until this call, the engine is busy even
        while no step ends (a long prefill). None by default."""

    def report(self) -> dict[str, float]:
        """Counters and gauges of the method for metrics (`draftwise:<method>_<key>`); none by default."""
        return {}

    # --- replicas behind one endpoint (server/ray_serve.py) ------------------------------

    def share(self) -> Sharing | None:
        """From now on, pool what the method learns from traffic with the other replicas:
        keep it for `take_shared` (a head learner stops training here: one shared learner
        trains for all). Returns what is pooled; None (the default) when the method learns
        nothing from traffic."""
        return None

    def take_shared(self) -> Learned:
        """What the method learned since the last call (after `share`), to send to the others;
        called from the replica's sync thread, not the engine's."""
        return Learned()

    def adopt(self, sequences: Sequence[list[int]] = (), learner: dict | None = None) -> None:
        """Take what the other replicas learned: their finished `sequences`, and the shared
        learner's answer to this replica's last exchange (`learner`: its counters, and newer
        weights when it has some; `OnlineLearner.receive`). Called from the replica's sync
        thread: a method hands anything the engine's thread uses over safely."""


# --- registry ---------------------------------------------------------------------------

_REGISTRY: dict[str, type[Proposer]] = {}


def register(cls: type[Proposer]) -> type[Proposer]:
    """Class decorator: make a proposer available by its `name`."""
    _REGISTRY[cls.name] = cls
    return cls


def proposer_class(method: str) -> type[Proposer]:
    if method not in _REGISTRY:
        raise ValueError(f"unknown speculator {method!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[method]


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


ProposerFactory = Callable[..., Proposer]


@dataclass
class Target:
    """What a proposer may know of the target: its model, tokenizer and load settings."""

    model: object  # draftwise.models.transformer.Transformer
    tokenizer: object
    dtype: object = None  # dtype name or torch.dtype the target was loaded in
    progress: bool = True
    max_batch_size: int = 8  # cache rows the engine uses (RequestState.row < this)
    max_model_len: int = 4096
    draft_model: object = None  # an already loaded draft model (tests, notebooks), used instead of config.model
    name: str = "the target"  # how messages name the target model (its --model reference when loaded by name)
