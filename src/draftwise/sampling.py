"""Sampling settings, and how they turn a model's logits into a distribution.

`SamplingParams` is the typed, validated set of options every request carries. The
functions below apply them (penalties, temperature, top-k, top-p, min-p) and are shared
by plain decoding and by verification, so both sample from the very same distribution.
`token_logprobs` reports the log-probabilities of emitted tokens when a request asks.

Randomness keyed by position (`sampling="coupled"`, the default for a request with a
seed): the token at output
position t is argmax_v p_t(v) / E_t(v), with E_t(v) ~ Exp(1) drawn from a generator seeded
by (seed, t) alone (`position_noise`). That is the Gumbel-max trick (log p - log E is log p
plus Gumbel noise), so the token is an exact sample of p_t; and because the noise does
not depend on how many draws came before, plain decoding, every speculator and every
batch composition commit the very same tokens for the same seed (verify.py,
`verify_coupled`). `sampling="rejection"` (the default without a seed) draws from the
request's generator in call order instead (classic speculative sampling: the same
distribution, not the same tokens). Measured on qwen2.5-coder-1.5b with its 0.5B draft
(4 tokens a step, 2026-12-02): mean accepted length 2.18 coupled vs 3.49 rejection at
temperature 1.0, 2.59 vs 3.17 at 0.7; with the EAGLE head's point-mass tree 1.42 vs 1.53
and 1.59 vs 1.62: the price of reproducibility, paid only when a seed asks for it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from draftwise.constraints.spec import StructuredOutputsParams

MAX_LOGPROBS = 20  # alternatives per token at most, as vLLM's default max_logprobs


class SamplingParams(BaseModel):
    """Options of one request, vLLM's names and defaults (temperature 1.0, 16 tokens; the
    CLI's `generate` and `bench` default to greedy instead, and say so in --help)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_tokens: int | None = Field(default=16, ge=1, description="new tokens to generate at most; None = up to "
                                                                  "the context window")
    min_tokens: int = Field(default=0, ge=0, description="no EOS / stop token / stop string before this many "
                                                         "new tokens")
    temperature: float = Field(default=1.0, ge=0.0, le=100.0, description="0 = greedy")
    top_k: int = Field(default=0, ge=-1, description="keep the k most likely tokens; 0 or -1 = off")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus mass kept")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0, description="drop tokens below min_p x max prob")
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0, description="HF style, over prompt and output")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="OpenAI style, over output")
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="OpenAI style, over output")
    logit_bias: dict[int, float] = Field(default_factory=dict, description="token id -> value added to its logit "
                                                                           "before anything else (-100 bans)")
    seed: int | None = Field(default=None, ge=0, description="seed of this request's random stream")
    n: int = Field(default=1, ge=1, le=128, description="samples per prompt (LLM.generate): sample i is seeded "
                                                         "seed + i, each its own random stream")
    stop: list[str] = Field(default_factory=list, description="stop strings (not in the text unless "
                                                              "include_stop_str_in_output)")
    stop_token_ids: list[int] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = Field(default=True, description="leave special tokens out of the text")
    sampling: Literal["coupled", "rejection"] | None = Field(
        default=None, description="coupled: randomness keyed by (seed, output position), so a seed gives the "
                                  "same tokens with or without speculation at any batch; rejection: classic "
                                  "speculative sampling (the same distribution only; a stochastic draft is "
                                  "accepted more often); default: coupled when a seed is set, else rejection")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS,
                                 description="return each output token's log-probability and the N most likely "
                                             "alternatives (None = off)")
    structured_outputs: StructuredOutputsParams | None = Field(
        default=None, description="the output must match this JSON schema / regex / choice / grammar (vLLM's "
                                  "StructuredOutputsParams; `guided_decoding=` is accepted too)")

    @model_validator(mode="before")
    @classmethod
    def _guided_decoding(cls, data: object) -> object:
        """vLLM's older name of structured_outputs."""
        if isinstance(data, dict) and "guided_decoding" in data:
            data = dict(data)
            guided = data.pop("guided_decoding")
            if guided is not None:
                if data.get("structured_outputs") is not None:
                    raise ValueError("give structured_outputs or guided_decoding (the same thing), not both")
                data["structured_outputs"] = guided
        return data

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_range(cls, v: dict[int, float]) -> dict[int, float]:
        for token, bias in v.items():
            if token < 0:
                raise ValueError(f"logit_bias token ids must be >= 0 (got {token})")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100] (got {bias} for token {token})")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def coupled(self) -> bool:
        """Position-keyed randomness (see the module docstring)?"""
        return self.sampling == "coupled" or (self.sampling is None and self.seed is not None)


# --- from logits to a distribution ---------------------------------------------------------
#
# Order: repetition penalty, presence/frequency penalties, temperature, then the
# truncations top-k, top-p, min-p, each on what the previous one left (vLLM's V0 sampler
# order; its V1 sampler applies min-p before top-k/top-p, which differs only when top-p and
# min-p are both set). Greedy (temperature 0) is a one-hot at the argmax of the penalized
# logits. Everything is computed in fp32 and never modifies the caller's tensor.


def _needs_history(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def _token_counts(ids: Sequence[int], vocab: int, device: torch.device) -> Tensor:
    """How often each token id occurs in `ids`; ids outside the vocabulary are ignored."""
    if len(ids) == 0:
        return torch.zeros(vocab, dtype=torch.float32, device=device)
    t = torch.as_tensor(list(ids), dtype=torch.long, device=device)
    return torch.bincount(t, minlength=vocab)[:vocab].to(torch.float32)  # [vocab]


def _path_pairs(n: int, parents: Sequence[int] | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """(row, node) pairs such that draft node `node` lies on the path root -> row-1.

    Row 0 is the root and sees no draft node; row j+1 sees node j and its ancestors.
    """
    if parents is None:  # chain: row j+1 sees nodes 0..j
        pairs = torch.tril_indices(n, n, device=device)  # [2, n(n+1)/2]
        return pairs[0] + 1, pairs[1]
    rows: list[int] = []
    nodes: list[int] = []
    ancestors: list[list[int]] = []
    for j, p in enumerate(parents):
        if not -1 <= p < j:
            raise ValueError(f"draft node {j} has parent {p}; parents must come before children")
        path = (ancestors[p] if p >= 0 else []) + [j]
        ancestors.append(path)
        rows.extend([j + 1] * len(path))
        nodes.extend(path)
    as_long = dict(dtype=torch.long, device=device)
    return torch.as_tensor(rows, **as_long), torch.as_tensor(nodes, **as_long)


def _draft_counts(
    draft_tokens: Sequence[int], parents: Sequence[int] | None, vocab: int, device: torch.device
) -> Tensor:
    """Counts of the draft tokens on each row's path (see `_path_pairs`)."""
    n = len(draft_tokens)
    counts = torch.zeros(n + 1, vocab, dtype=torch.float32, device=device)  # [n+1, vocab]
    if n == 0:
        return counts
    row_t, node_t = _path_pairs(n, parents, device)  # [pairs], [pairs]
    tokens = torch.as_tensor(list(draft_tokens), dtype=torch.long, device=device)  # [n]
    tok_t = tokens[node_t]  # [pairs]
    inside = tok_t < vocab  # [pairs]
    row_t, tok_t = row_t[inside], tok_t[inside]
    counts.index_put_((row_t, tok_t), torch.ones(len(tok_t), device=device), accumulate=True)
    return counts


def apply_penalties(
    logits: Tensor,
    params: SamplingParams,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    draft_tokens: Sequence[int] = (),
    parents: Sequence[int] | None = None,
) -> Tensor:
    """Repetition, presence and frequency penalties, per row with that row's own history.

    logits: [n+1, vocab] fp32. Repetition (HF): every token seen in prompt, output or the
    row's draft path has its logit divided by the penalty if positive, multiplied if not.
    Presence/frequency (OpenAI): over output and draft path tokens only,
    logit -= frequency * count + presence * (count > 0).
    """
    if not _needs_history(params):
        return logits
    vocab, device = logits.shape[-1], logits.device
    output_counts = _token_counts(output_ids, vocab, device)  # [vocab]
    path_counts = _draft_counts(draft_tokens, parents, vocab, device)  # [n+1, vocab]
    out = logits
    if params.repetition_penalty != 1.0:
        prompt_counts = _token_counts(prompt_ids, vocab, device)  # [vocab]
        seen = (path_counts + (prompt_counts + output_counts)[None, :]) > 0  # [n+1, vocab]
        rp = params.repetition_penalty
        penalized = torch.where(out > 0, out / rp, out * rp)
        out = torch.where(seen, penalized, out)
    if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        counts = path_counts + output_counts[None, :]  # [n+1, vocab]
        out = out - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(out.dtype)
    return out


def draft_depths(parents: Sequence[int] | None, n: int) -> list[int]:
    """Depth of each of n draft nodes below the root (children of the root have depth 1;
    a chain when parents is None)."""
    if parents is None:
        return list(range(1, n + 1))
    depth: list[int] = []
    for p in parents:
        depth.append(1 if p < 0 else depth[p] + 1)
    return depth


def apply_logit_rules(logits: Tensor, params: SamplingParams, done: int, parents: Sequence[int] | None,
                      banned: Sequence[int]) -> Tensor:
    """logit_bias added; the `banned` ids set to -inf at rows whose output position (`done`
    tokens already out, plus the row's depth) comes before min_tokens. Both before penalties,
    as vLLM's logits processors."""
    vocab = logits.shape[-1]
    if params.logit_bias:
        ids = [t for t in params.logit_bias if t < vocab]
        if ids:
            bias = torch.zeros(vocab, dtype=logits.dtype, device=logits.device)
            bias[ids] = torch.tensor([params.logit_bias[t] for t in ids], dtype=logits.dtype, device=bias.device)
            logits = logits + bias
    if params.min_tokens > done and banned:
        depths = [0] + draft_depths(parents, logits.shape[0] - 1)  # row r samples output position done + depth
        early = [r for r, d in enumerate(depths) if done + d < params.min_tokens]
        ids = [t for t in banned if t < vocab]
        if early and ids:
            logits = logits.clone()  # never the caller's tensor
            rows = torch.tensor(early, device=logits.device)[:, None]
            logits[rows, torch.tensor(ids, device=logits.device)[None, :]] = float("-inf")
    return logits


def apply_allowed(x: Tensor, allowed: Tensor, raw: Tensor) -> Tensor:
    """x [n+1, vocab] with tokens outside `allowed` [n+1, vocab'] at -inf (tokens past the
    mask's width are not allowed). A row left with nothing (min_tokens banned all the grammar
    allows) is taken from the raw logits under the mask alone."""
    keep = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    width = min(allowed.shape[-1], x.shape[-1])
    keep[:, :width] = allowed[:, :width].to(x.device)
    out = x.masked_fill(~keep, float("-inf"))
    empty = ~torch.isfinite(out).any(dim=-1)  # [n+1]
    if bool(empty.any()):
        out[empty] = raw.float()[empty].masked_fill(~keep[empty], float("-inf"))
    return out


def _top_k_mask(logits: Tensor, k: int) -> Tensor:
    """Keep tokens whose logit is at least the k-th largest (ties kept, as vLLM)."""
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # [rows, 1]
    return logits >= kth  # [rows, vocab]


def _top_p_mask(probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest most-likely prefix whose mass reaches top_p (the top token always)."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)  # [rows, vocab]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [rows, vocab]
    keep_sorted = mass_before < top_p
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def _min_p_mask(probs: Tensor, min_p: float) -> Tensor:
    """Keep tokens with probability at least min_p x the row's top probability."""
    return probs >= min_p * probs.max(dim=-1, keepdim=True).values


def target_distribution(
    logits: Tensor,
    params: SamplingParams,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    draft_tokens: Sequence[int] = (),
    parents: Sequence[int] | None = None,
    banned: Sequence[int] = (),
    allowed: Tensor | None = None,
) -> Tensor:
    """The distribution to sample from at each verification row.

    logits: [n+1, vocab]; row 0 follows the last committed token, row j+1 follows draft node j
    (whose history adds the draft tokens on the path root -> j; `parents` as in `Draft`).
    `banned`: token ids that may not come before output position `params.min_tokens` (the
    request's EOS and stop tokens). `allowed`: [n+1, vocab] bool, the tokens a constraint
    (grammar) allows at each row; the others get probability 0 before anything else is
    computed from the logits (a row where min_tokens' ban leaves nothing allowed keeps the
    grammar's choice: the grammar wins). Returns [n+1, vocab] fp32 probabilities (one-hot
    at the argmax when greedy).
    """
    if logits.dim() != 2 or logits.shape[0] != len(draft_tokens) + 1:
        raise ValueError(f"logits {tuple(logits.shape)} do not match a draft of {len(draft_tokens)} tokens")
    if parents is not None and len(parents) != len(draft_tokens):
        raise ValueError(f"{len(parents)} parents for {len(draft_tokens)} draft tokens")
    x = apply_logit_rules(logits.float(), params, len(output_ids), parents, banned)  # [n+1, vocab]
    if allowed is not None:
        x = apply_allowed(x, allowed, logits)
    x = apply_penalties(x, params, prompt_ids, output_ids, draft_tokens, parents)  # [n+1, vocab]
    if params.greedy:
        return torch.zeros_like(x).scatter_(-1, x.argmax(dim=-1, keepdim=True), 1.0)
    x = x / params.temperature
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:
        x = x.masked_fill(~_top_k_mask(x, params.top_k), float("-inf"))
    probs = torch.softmax(x, dim=-1)  # [n+1, vocab]
    if params.top_p < 1.0 or params.min_p > 0.0:
        keep = torch.ones_like(probs, dtype=torch.bool)
        if params.top_p < 1.0:
            keep &= _top_p_mask(probs, params.top_p)
        if params.min_p > 0.0:
            keep &= _min_p_mask(probs, params.min_p)  # ratios to the max survive renormalization
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per row: [n, vocab] probabilities -> [n] token ids (a one-hot gives its argmax).

    Rows may be unnormalized non-negative weights. The draw happens on the generator's
    device (keep probs there to avoid a copy); the ids come back on probs' device.
    """
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --- randomness keyed by (seed, position) ------------------------------------------------------


def position_noise(seed: int, position: int, vocab: int, device=None) -> Tensor:
    """Exp(1) variates [vocab] (float64) for output position `position` of a request with
    this seed: a pure function of (seed, position), the same on every call and device."""
    key = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(key, "little") >> 1)
    u = torch.rand(vocab, generator=gen, dtype=torch.float64)  # [0, 1)
    e = -torch.log1p(-u)  # Exp(1); 0 only for u = 0 (probability 2^-53)
    return e if device is None else e.to(device)


def coupled_pick(probs: Tensor, seed: int, position: int, noise: Tensor | None = None) -> int:
    """The token at `position`: argmax p(v) / E(v) over probs [vocab] (a sample of p)."""
    e = noise if noise is not None else position_noise(seed, position, probs.shape[-1], probs.device)
    return int((probs.double() / e.to(probs.device)).argmax())


# --- log-probabilities of emitted tokens ---------------------------------------------------


@dataclass
class TokenLogprob:
    """An emitted token's log-probability and the `top` most likely tokens at its position,
    under the target model's own distribution (raw logits: before penalties, temperature
    and truncation, as vLLM reports them by default)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    rank: int | None = None  # of the token at its position: 1 + how many tokens are more likely


def token_logprobs(logits: Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """Logits `[n, vocab]` of the positions that emitted `tokens` (n of them)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    picked = lp[torch.arange(len(tokens), device=lp.device), torch.as_tensor(list(tokens), device=lp.device)]  # [n]
    chosen = picked.tolist()
    ranks = (1 + (lp > picked[:, None]).sum(dim=-1)).tolist()  # [n]
    if top > 0:
        values, ids = lp.topk(top, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in tokens]
    return [TokenLogprob(t, c, tp, r) for t, c, tp, r in zip(tokens, chosen, tops, ranks)]
