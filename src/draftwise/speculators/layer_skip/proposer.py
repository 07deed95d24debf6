"""`layer_skip`: the target drafts for itself with its first L layers (early exit).

The draft is the target's layers [0, L), then the target's final norm and LM head: no
extra weights. It drafts a chain of k tokens, one single-token pass each, exactly like a
separate draft model would, and with sampling hands its distributions to rejection
sampling.

KV cache. Keys/values of layers < L depend only on the tokens, so for committed tokens
the draft's KV equals the target's. Two modes:

- shared (`attach_target_cache(engine.cache)`): the draft reads the target's committed
  KV of layers < L and writes its own tokens into the scratch slots after each row's
  committed length, which the verify pass overwrites anyway. No catch-up pass, no extra
  memory. The engine attaches its cache when it is built (`Proposer.attach_target_cache`).
- own (default): a private cache of L layers, kept in step with the committed tokens
  (catch up on the unseen ones, then draft; on acceptance keep what the target kept).
  It costs an L-layer prefill per request and L/N of the target's cache memory.

L comes from `SpeculativeConfig.num_layers`, or else from a short calibration
(`layer_skip/calibration.py`: measured early-exit acceptance against cost).

The draft runs the target's first L layers with `models/partial.py` and drafts with the
chain loop of `speculators/chain.py`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from draftwise.cache import BLOCK, KVCache
from draftwise.config import SpeculativeConfig
from draftwise.errors import BadInput
from draftwise.models.partial import lm_logits, padded_groups, partial_inputs, run_layers
from draftwise.models.transformer import Transformer
from draftwise.request import RequestState
from draftwise.speculators.base import Draft, Proposer, Target, register
from draftwise.speculators.chain import CacheBook, draft_chain
from draftwise.speculators.layer_skip.calibration import CALIBRATION_TEXT, calibrate, pick_num_layers

# --- the proposer -----------------------------------------------------------------------


@register
class LayerSkipProposer(Proposer):
    name = "layer_skip"

    def __init__(self, model: Transformer, num_layers: int, max_batch_size: int, max_model_len: int, k_max: int,
                 calibration: dict[int, tuple[float, float, float]] | None = None) -> None:
        n = len(model.model.layers)
        if not 1 <= num_layers <= n:
            raise BadInput(f"layer_skip num_layers must be in [1, {n}] for this {n}-layer model, got {num_layers}")
        self.model = model
        self.num_layers = num_layers
        self.calibration = calibration or {}
        c = model.config
        cap = min(max_model_len + k_max + 2, c.max_position_embeddings) + BLOCK
        self.cache = KVCache(num_layers, max_batch_size, c.num_key_value_heads, c.head_dim, cap, model.dtype,
                             model.device)
        self.shared = False
        self.book = CacheBook()  # own cache: what it holds of each request

    @classmethod
    def from_config(cls, config: SpeculativeConfig, target: Target) -> "LayerSkipProposer":
        model = target.model
        calibration = None
        num_layers = config.num_layers
        if num_layers is None:
            ids = target.tokenizer.encode(CALIBRATION_TEXT) if target.tokenizer is not None else []
            vocab = model.config.vocab_size
            ids = [i for i in ids if 0 <= i < vocab]
            if len(ids) >= 8:
                calibration = calibrate(model, ids, max(1, config.num_speculative_tokens))
                num_layers = pick_num_layers({L: a for L, (a, _, _) in calibration.items()},
                                             {L: c for L, (_, c, _) in calibration.items()},
                                             max(1, config.num_speculative_tokens))
            else:
                num_layers = max(1, len(model.model.layers) // 2)
        return cls(model, num_layers, target.max_batch_size, target.max_model_len, config.num_speculative_tokens,
                   calibration)

    def attach_target_cache(self, cache: KVCache) -> None:
        """Share the target's KV cache (see the module docstring). Call before any request."""
        if cache.k.shape[0] < self.num_layers:
            raise ValueError("the shared cache has fewer layers than the draft runs")
        self.cache, self.shared = cache, True

    # --- lifecycle ----------------------------------------------------------------------

    def begin(self, request: RequestState) -> None:
        self.book.begin(request.request_id)

    def end(self, request: RequestState) -> None:
        self.book.end(request.request_id)

    def on_accept(self, request: RequestState, num_accepted: int) -> None:
        if not self.shared and request.request_id in self.book.seen:
            self.book.accept(request.request_id, num_accepted)

    # --- drafting -----------------------------------------------------------------------

    def _start(self, req: RequestState) -> int:
        """Committed slots of the request's row that the draft can use as they are."""
        return int(self.cache.lengths[req.row]) if self.shared else self.book.seen.setdefault(req.request_id, 0)

    def propose(self, requests: Sequence[RequestState], num_tokens: Sequence[int]) -> Draft:
        device = self.model.device
        filled: dict[int, int] = {}  # request index -> slots written (and visible) in its row

        def next_logits(depth: int, live: list[int], draft: Draft) -> torch.Tensor:
            reqs = [requests[i] for i in live]
            rows = torch.tensor([r.row for r in reqs], device=device)
            if depth > 0:  # one pass over each live request's newest draft token
                step_ids = torch.tensor([[draft.tokens[i][-1]] for i in live], device=device)  # [m, 1]
                lengths = torch.tensor([filled[i] for i in live], device=device)  # [m]
                for i in live:
                    filled[i] += 1
                return self._run(step_ids, lengths[:, None], lengths, rows)  # [m, vocab]
            starts = [self._start(r) for r in reqs]
            pending = [r.all_ids[s:] for r, s in zip(reqs, starts)]
            logits = torch.empty(len(reqs), self.model.head_weight.shape[0], device=device)  # [n, vocab]
            for group in padded_groups(starts, [len(p) for p in pending], self.cache.capacity):
                g = torch.tensor(group, device=device)
                logits[g] = self._catch_up([pending[j] for j in group], [starts[j] for j in group], rows[g]).float()
            for i, r, s, p in zip(live, reqs, starts, pending):
                filled[i] = s + len(p)
                if not self.shared:
                    self.book.seen[r.request_id] = filled[i]
            return logits

        draft = draft_chain(requests, num_tokens, next_logits)
        self.book.drafted(requests, draft)
        return draft

    def _catch_up(self, pending: list[list[int]], starts: list[int], rows: torch.Tensor) -> torch.Tensor:
        """Run each row's unseen committed tokens after its `starts` slots; logits after
        the last one [b, vocab]."""
        device = self.model.device
        t = max(len(p) for p in pending)
        ids = torch.zeros(len(pending), t, dtype=torch.long)
        for j, p in enumerate(pending):
            ids[j, : len(p)] = torch.tensor(p)
        start_t = torch.tensor(starts, device=device)  # [b]
        positions = start_t[:, None] + torch.arange(t, device=device)  # [b, T]
        last = torch.tensor([len(p) - 1 for p in pending], device=device)
        return self._run(ids.to(device), positions, start_t, rows, last)

    @torch.inference_mode()
    def _run(self, ids: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor,
             at: torch.Tensor | None = None) -> torch.Tensor:
        """Layers [0, L), norm and head over ids [b, T] written after `lengths` [b]: logits
        [b, vocab] at index `at` [b] of each row (the last index when None)."""
        step = partial_inputs(self.model, positions, self.cache, lengths, rows)
        x = self.model.model.embed_tokens(ids)  # [b, T, hidden]
        x = run_layers(self.model.model.layers[: self.num_layers], x, step)
        if at is None:
            return lm_logits(self.model, x[:, -1])
        return lm_logits(self.model, x[torch.arange(x.shape[0], device=x.device), at])
