"""`draft_model`: a separate small model with the target's tokenizer drafts k tokens.

The draft keeps its own KV cache, one row per engine row, in step with the committed
tokens: before drafting it catches up on whatever it has not seen (the bonus token, and
the last accepted draft token, which it proposed but never ran), then runs k single-token
passes for all requests at once. A request's prompt is prefilled into the draft the first
time it drafts, not at admission: while the controller keeps speculation off (a large
batch), requests never pay for the draft model at all. On acceptance it rolls its cache
back to the tokens it drafted that the target kept. With temperature > 0 it samples from
its own distribution under the request's sampling settings and hands those probabilities
to rejection sampling.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from draftwise.config import SpeculativeConfig
from draftwise.errors import BadInput
from draftwise.request import RequestState
from draftwise.speculators.base import Draft, Proposer, Target, register
from draftwise.speculators.chain import CacheBook, draft_chain


def check_same_vocabulary(target_tok, draft_tok, target_name: str, draft_name: str) -> None:
    """Refuse a draft whose tokenizer maps tokens to ids differently from the target's."""
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise BadInput(
            f"draft model {draft_name!r} has a different vocabulary from the target {target_name!r}: "
            "a draft model must share the target's tokenizer (e.g. qwen2.5-coder-0.5b for qwen2.5-coder-1.5b)"
        )


# What a quantized target's draft model runs in when the config does not say. Beside a
# w4a8 target (the CPU kernel): w4a8-all, the only setting cheap enough that the
# controller keeps drafting (10 prompts on a 2-core AMD EPYC: 1.10x plain, mean accepted
# length 2.31; a bf16 or w8a8-all draft was switched off there, as on an Intel Xeon);
# docs/results.md, "The draft model's own quantization". Beside other quantizations (int8,
# int4, w8a8, which CUDA runs too): int8 weights and activations.
BESIDE_W4A8 = "w4a8-all"
DEFAULT_DRAFT_QUANTIZATION = "w8a8-all"


def draft_quantization(config: SpeculativeConfig, target_quantization: str) -> str:
    """The draft's quantization: the config's, else none beside an unquantized target,
    w4a8-all beside a w4a8 one, else the default."""
    if config.draft_quantization is not None:
        return config.draft_quantization
    if target_quantization == "none":
        return "none"
    return BESIDE_W4A8 if target_quantization.startswith("w4a8") else DEFAULT_DRAFT_QUANTIZATION


@register
class DraftModelProposer(Proposer):
    name = "draft_model"

    def __init__(self, draft, target_vocab: int, max_batch_size: int, max_model_len: int, k_max: int) -> None:
        self.draft = draft
        self.target_vocab = target_vocab
        self.cache = draft.new_cache(max_batch_size, max_model_len + k_max + 2)
        self.book = CacheBook()  # what the draft cache holds of each request

    @classmethod
    def from_config(cls, config: SpeculativeConfig, target: Target) -> "DraftModelProposer":
        from draftwise.models.build import load_model

        if target.draft_model is not None:
            draft = target.draft_model
        elif not config.model:
            raise BadInput("speculator draft_model needs a draft model (--draft-model NAME|PATH)")
        else:
            quantization = draft_quantization(config, getattr(target.model, "quantization", "none"))
            draft, tok = load_model(config.model, target.dtype or "bf16", str(target.model.device), target.progress,
                                    quantization)
            check_same_vocabulary(target.tokenizer, tok, target.name, config.model)
        return cls(draft, target.model.config.vocab_size, target.max_batch_size, target.max_model_len,
                   config.num_speculative_tokens)

    def begin(self, request: RequestState) -> None:
        self.book.begin(request.request_id)
        self.cache.set_length(request.row, 0)

    def end(self, request: RequestState) -> None:
        self.book.end(request.request_id)

    def on_accept(self, request: RequestState, num_accepted: int) -> None:
        self.cache.set_length(request.row, self.book.accept(request.request_id, num_accepted))

    # --- drafting ---------------------------------------------------------------------

    def propose(self, requests: Sequence[RequestState], num_tokens: Sequence[int]) -> Draft:
        prefill_seconds = 0.0

        def next_logits(depth: int, live: list[int], draft: Draft) -> torch.Tensor:
            nonlocal prefill_seconds
            reqs = [requests[i] for i in live]
            if depth > 0:
                return self._feed_last(reqs, [draft.tokens[i][-1] for i in live])
            fresh = [r for r in reqs if self.book.seen[r.request_id] == 0]
            if fresh:  # first draft of these requests: prefill their prompts (timed apart)
                start = time.perf_counter()
                self._catch_up(fresh, prompt_only=True)
                prefill_seconds = time.perf_counter() - start
            return self._catch_up(reqs)  # [n, vocab] after each request's last committed token

        draft = draft_chain(requests, num_tokens, next_logits, self.target_vocab)
        draft.prefill_seconds = prefill_seconds
        self.book.drafted(requests, draft)
        return draft

    def _catch_up(self, reqs: list[RequestState], prompt_only: bool = False) -> torch.Tensor:
        """Run each request's unseen committed tokens (of its prompt only, with
        `prompt_only`); logits after the last one `[n, vocab]`. Requests with the same
        number of unseen tokens share a pass (no padding, so a row near the end of its
        cache never gets slots written past it)."""
        seen = self.book.seen
        pending = [r.all_ids[seen[r.request_id]: len(r.prompt_ids) if prompt_only else None] for r in reqs]
        logits: list[torch.Tensor | None] = [None] * len(reqs)
        groups: dict[int, list[int]] = {}
        for j, p in enumerate(pending):
            groups.setdefault(len(p), []).append(j)
        device = self.draft.device
        for t, members in groups.items():
            ids = torch.tensor([pending[j] for j in members], device=device)  # [n, t]
            starts = torch.tensor([seen[reqs[j].request_id] for j in members], device=device)
            pos = starts[:, None] + torch.arange(t, device=device)
            rows = torch.tensor([reqs[j].row for j in members], device=device)
            last = torch.full((len(members), 1), t - 1, device=device)
            out = self.draft(ids, pos, self.cache, rows=rows, logits_at=last)
            for i, j in enumerate(members):
                logits[j] = out.logits[i, 0]
                seen[reqs[j].request_id] += t
                self.cache.set_length(reqs[j].row, seen[reqs[j].request_id])
        return torch.stack(logits)  # type: ignore[arg-type]

    def _feed_last(self, reqs: list[RequestState], tokens: list[int]) -> torch.Tensor:
        """One draft pass over each request's newest draft token; logits after it [n, vocab]."""
        device = self.draft.device
        ids = torch.tensor([[t] for t in tokens], device=device)
        rows = torch.tensor([r.row for r in reqs], device=device)
        lengths = self.cache.lengths[rows]
        out = self.draft(ids, lengths[:, None], self.cache, rows=rows)
        self.cache.lengths[rows] = lengths + 1
        return out.logits[:, 0]
