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
from draftwise.sampling import target_distribution
from draftwise.speculators.base import Draft, Proposer, Target, register


def check_same_vocabulary(target_tok, draft_tok, target_name: str, draft_name: str) -> None:
    """Refuse a draft whose tokenizer maps tokens to ids differently from the target's."""
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise BadInput(
            f"draft model {draft_name!r} has a different vocabulary from the target {target_name!r}: "
            "a draft model must share the target's tokenizer (e.g. qwen2.5-coder-0.5b for qwen2.5-coder-1.5b)"
        )


# What a quantized target's draft model runs in when the config does not say: int8 weights
# and activations, the smaller rounding of the fast CPU settings (a w4a8-all draft halved
# acceptance on the 1.5B pair); docs/benchmarks.md, "The draft model's own quantization",
# has the measurements, which do not yet rank the settings.
DEFAULT_DRAFT_QUANTIZATION = "w8a8-all"


def draft_quantization(config: SpeculativeConfig, target_quantization: str) -> str:
    """The draft's quantization: the config's, else none beside an unquantized target, else the default."""
    if config.draft_quantization is not None:
        return config.draft_quantization
    return "none" if target_quantization == "none" else DEFAULT_DRAFT_QUANTIZATION


@register
class DraftModelProposer(Proposer):
    name = "draft_model"

    def __init__(self, draft, target_vocab: int, max_batch_size: int, max_model_len: int, k_max: int) -> None:
        self.draft = draft
        self.target_vocab = target_vocab
        self.cache = draft.new_cache(max_batch_size, max_model_len + k_max + 2)
        self.seen: dict[str, int] = {}  # request id -> tokens of all_ids in the draft cache
        self._drafted: dict[str, int] = {}  # request id -> draft tokens of the last step it ran

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
        self.seen[request.request_id] = 0
        self.cache.set_length(request.row, 0)

    def end(self, request: RequestState) -> None:
        self.seen.pop(request.request_id, None)
        self._drafted.pop(request.request_id, None)

    def on_accept(self, request: RequestState, num_accepted: int) -> None:
        # the draft ran the context plus its first k-1 draft tokens; keep those accepted
        rid = request.request_id
        kept = self.seen[rid] + min(num_accepted, self._drafted.pop(rid, 0))
        self.seen[rid] = kept
        self.cache.set_length(request.row, kept)

    # --- drafting ---------------------------------------------------------------------

    def propose(self, requests: Sequence[RequestState], num_tokens: Sequence[int]) -> Draft:
        active = [i for i, k in enumerate(num_tokens) if k > 0]
        draft = Draft.empty(len(requests))
        if not active:
            return draft
        reqs = [requests[i] for i in active]
        fresh = [r for r in reqs if self.seen[r.request_id] == 0]
        if fresh:  # first draft of these requests: prefill their prompts (timed apart)
            start = time.perf_counter()
            self._catch_up(fresh, prompt_only=True)
            draft.prefill_seconds = time.perf_counter() - start
        logits = self._catch_up(reqs)  # [n, vocab] after each request's last committed token
        probs_rows: list[list[torch.Tensor]] = [[] for _ in reqs]
        live = list(range(len(reqs)))
        for step in range(max(num_tokens[i] for i in active)):
            for j in live:
                req, i = reqs[j], active[j]
                q = self._distribution(req, logits[j], draft.tokens[i])  # [vocab]
                tok = req.draw(q, ahead=len(draft.tokens[i]))
                draft.tokens[i].append(tok)
                probs_rows[j].append(q)
            live = [j for j in live if len(draft.tokens[active[j]]) < num_tokens[active[j]]]
            if not live:
                break
            logits = self._feed_last(reqs, live, draft, active, logits)
        for j, req in enumerate(reqs):
            i = active[j]
            self._drafted[req.request_id] = len(draft.tokens[i]) - 1  # fed to the draft: all but the last
            if not req.params.greedy:
                draft.probs[i] = torch.stack(probs_rows[j])  # [k, vocab]
        return draft

    def _distribution(self, req: RequestState, logits: torch.Tensor, drafted: list[int]) -> torch.Tensor:
        """The draft's distribution under the request's sampling settings, over the target vocab."""
        logits = logits.float()
        if logits.shape[-1] != self.target_vocab:  # embedding tables padded to different sizes
            fixed = logits.new_full((self.target_vocab,), float("-inf"))
            n = min(self.target_vocab, logits.shape[-1])
            fixed[:n] = logits[:n]
            logits = fixed
        return target_distribution(logits[None], req.params, req.prompt_ids, req.output_ids + drafted)[0]

    def _catch_up(self, reqs: list[RequestState], prompt_only: bool = False) -> torch.Tensor:
        """Run each request's unseen committed tokens (of its prompt only, with
        `prompt_only`); logits after the last one `[n, vocab]`. Requests with the same
        number of unseen tokens share a pass (no padding, so a row near the end of its
        cache never gets slots written past it)."""
        pending = [r.all_ids[self.seen[r.request_id]: len(r.prompt_ids) if prompt_only else None] for r in reqs]
        logits: list[torch.Tensor | None] = [None] * len(reqs)
        groups: dict[int, list[int]] = {}
        for j, p in enumerate(pending):
            groups.setdefault(len(p), []).append(j)
        device = self.draft.device
        for t, members in groups.items():
            ids = torch.tensor([pending[j] for j in members], device=device)  # [n, t]
            starts = torch.tensor([self.seen[reqs[j].request_id] for j in members], device=device)
            pos = starts[:, None] + torch.arange(t, device=device)
            rows = torch.tensor([reqs[j].row for j in members], device=device)
            last = torch.full((len(members), 1), t - 1, device=device)
            out = self.draft(ids, pos, self.cache, rows=rows, logits_at=last)
            for i, j in enumerate(members):
                logits[j] = out.logits[i, 0]
                self.seen[reqs[j].request_id] += t
                self.cache.set_length(reqs[j].row, self.seen[reqs[j].request_id])
        return torch.stack(logits)  # type: ignore[arg-type]

    def _feed_last(self, reqs, live: list[int], draft: Draft, active: list[int], logits: torch.Tensor) -> torch.Tensor:
        """One draft pass over the newest draft token of each live request."""
        device = self.draft.device
        ids = torch.tensor([[draft.tokens[active[j]][-1]] for j in live], device=device)
        rows = torch.tensor([reqs[j].row for j in live], device=device)
        lengths = self.cache.lengths[rows]
        out = self.draft(ids, lengths[:, None], self.cache, rows=rows)
        self.cache.lengths[rows] = lengths + 1
        logits = logits.clone()
        logits[live] = out.logits[:, 0].to(logits.dtype)
        return logits
