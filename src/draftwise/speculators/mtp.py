"""`mtp`: DeepSeek-V3-style multi-token-prediction modules draft a chain.

Module d (d = 0..D-1) at sequence position i combines the previous depth's hidden state
with the embedding of the token d+1 places ahead and predicts the one after it:

    h^{d+1}_i = Block_d( M_d [ RMSNorm_e(Emb(t_{i+d+1})) ; RMSNorm_h(h^d_i) ] )
    p(t_{i+d+2}) = softmax( Head( RMSNorm_d(h^{d+1}_i) ) )

h^0 is the target's last hidden state (before its final norm; `hnorm` normalizes it),
Emb and Head are the target's, Block_d is one decoder layer of the target's architecture
attending causally over module d's earlier positions, with RoPE position i. The concat
puts the embedding first, as released MTP checkpoints (DeepSeek-V3, GLM) and vLLM do
(the paper writes h first; only the column order of M_d differs).

Drafting, with n committed tokens t_0..t_{n-1} and target hidden states for positions
0..n-2: module d runs at positions up to n-2 and its output at n-2 gives draft token d
(module 0 reads the bonus token t_{n-1}, module d > 0 the previous draft token). Each
module keeps its own KV cache over the positions whose inputs are all committed
(i <= n-2-d), and its outputs there wait as the next module's inputs, so every module
sees exactly the prefix it was trained on. The draft length is at most D; with sampling
the draft tokens are drawn from the modules' distributions and verified by speculative
sampling, so the output is the target's in distribution either way.

Checkpoint layout (`SpeculativeConfig.model` = a folder), no public small model ships one:

- `mtp.json`: {"format": "draftwise-mtp", "num_modules": D} plus optional overrides of
  the target's block config (e.g. "intermediate_size").
- `mtp.safetensors`, for each d < D:
    `layers.{d}.enorm.weight` [H], `layers.{d}.hnorm.weight` [H],
    `layers.{d}.eh_proj.weight` [H, 2H] (input [enorm(emb); hnorm(h)]),
    `layers.{d}.block.` + the decoder-layer keys in Hugging Face naming
      (`self_attn.{q,k,v,o}_proj.weight`, q/k/v biases for Qwen2, `self_attn.{q,k}_norm`
      for Qwen3, `mlp.{gate,up,down}_proj.weight`, `input_layernorm.weight`,
      `post_attention_layernorm.weight`),
    `layers.{d}.norm.weight` [H] (the norm before the shared head; DeepSeek's
      `shared_head.norm`).
  A DeepSeek-V3 MTP layer `model.layers.{N+d}.{enorm,hnorm,eh_proj,shared_head.norm}`
  maps onto this by renaming (its MoE/MLA block itself is not supported here).
`save_mtp` writes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from draftwise.cache import BLOCK, KVCache
from draftwise.config import SpeculativeConfig
from draftwise.errors import BadInput
from draftwise.models.config import ModelConfig
from draftwise.models.transformer import DecoderLayer, RMSNorm, proj
from draftwise.models.partial import padded_groups, partial_inputs
from draftwise.request import RequestState
from draftwise.speculators.base import Draft, Proposer, Target, register
from draftwise.speculators.chain import draft_chain

CONFIG_FILE, WEIGHTS_FILE = "mtp.json", "mtp.safetensors"


class MTPLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.enorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.block = DecoderLayer(cfg, index)  # its attention uses layer `index` of the MTP cache
        self.norm = RMSNorm(h, cfg.rms_norm_eps)

    def forward(self, emb: torch.Tensor, hidden: torch.Tensor, step) -> torch.Tensor:
        """emb, hidden [b, T, H] -> next depth's hidden [b, T, H] (before `norm`)."""
        x = proj(self.eh_proj, torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1))
        return self.block(x, step)


class MTPModules(nn.Module):
    """D modules sharing the target's embedding and LM head."""

    def __init__(self, cfg: ModelConfig, num_modules: int) -> None:
        super().__init__()
        self.config = cfg.model_copy(update={"num_hidden_layers": num_modules})
        self.layers = nn.ModuleList(MTPLayer(self.config, d) for d in range(num_modules))

    @property
    def num_modules(self) -> int:
        return len(self.layers)

    @classmethod
    def for_target(cls, target_config: ModelConfig, num_modules: int, **overrides) -> "MTPModules":
        """Modules shaped for a target (block config = the target's, plus `overrides`)."""
        return cls(target_config.model_copy(update=overrides), num_modules)


def save_mtp(modules: MTPModules, folder: str | Path, **overrides) -> None:
    """Write our layout; `overrides` (e.g. intermediate_size) go to mtp.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"format": "draftwise-mtp", "num_modules": modules.num_modules, **overrides}
    (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in modules.state_dict().items()}, str(folder / WEIGHTS_FILE))


def load_mtp(path: str | Path, target_config: ModelConfig) -> MTPModules:
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / CONFIG_FILE).exists():
        raise BadInput(f"{path} is not an MTP checkpoint (no {CONFIG_FILE}; see draftwise.speculators.mtp)")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    overrides = {k: v for k, v in cfg.items() if k not in ("format", "num_modules")}
    try:
        modules = MTPModules.for_target(target_config, int(cfg["num_modules"]), **overrides)
        modules.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise BadInput(f"MTP checkpoint {path} does not fit the target: {str(e).splitlines()[0]}") from None
    return modules


# --- the proposer -----------------------------------------------------------------------


class _State:
    """Per request: inputs waiting for each module, and each module's committed positions."""

    def __init__(self, num_modules: int, hidden: int, dtype, device) -> None:
        # waiting[d]: h^d at positions cached[d], cached[d]+1, ... (all inputs committed) [m, H]
        self.waiting = [torch.empty(0, hidden, dtype=dtype, device=device) for _ in range(num_modules)]
        self.cached = [0] * num_modules


@register
class MTPProposer(Proposer):
    name = "mtp"
    hidden_layers = (-1,)

    def __init__(self, model, modules: MTPModules, max_batch_size: int, max_model_len: int, k_max: int) -> None:
        if modules.config.hidden_size != model.config.hidden_size:
            raise BadInput("MTP modules and target differ in hidden size")
        self.model = model
        self.mtp = modules.to(device=model.device, dtype=model.dtype).eval()
        c = modules.config
        cap = min(max_model_len + k_max + 2, model.config.max_position_embeddings) + BLOCK
        self.cache = KVCache(modules.num_modules, max_batch_size, c.num_key_value_heads, c.head_dim, cap,
                             model.dtype, model.device)
        self.states: dict[str, _State] = {}

    @classmethod
    def from_config(cls, config: SpeculativeConfig, target: Target) -> "MTPProposer":
        if isinstance(target.draft_model, MTPModules):
            modules = target.draft_model
        elif config.model:
            modules = load_mtp(config.model, target.model.config)
        else:
            raise BadInput("speculator mtp needs MTP modules: --draft-model PATH (a folder with mtp.json)")
        return cls(target.model, modules, target.max_batch_size, target.max_model_len, config.num_speculative_tokens)

    def begin(self, request: RequestState) -> None:
        self.states[request.request_id] = _State(self.mtp.num_modules, self.model.config.hidden_size,
                                                 self.model.dtype, self.model.device)

    def end(self, request: RequestState) -> None:
        self.states.pop(request.request_id, None)

    def on_hidden(self, request: RequestState, hidden: dict[int, torch.Tensor]) -> None:
        st = self.states.get(request.request_id)
        if st is not None:
            h = next(iter(hidden.values()))  # [n, H] last target layer, before the final norm
            st.waiting[0] = torch.cat([st.waiting[0], h])

    # --- drafting -----------------------------------------------------------------------

    def propose(self, requests: Sequence[RequestState], num_tokens: Sequence[int]) -> Draft:
        budgets = [min(k, self.mtp.num_modules) if r.request_id in self.states else 0
                   for r, k in zip(requests, num_tokens)]
        tails: dict[int, torch.Tensor] = {i: self._empty() for i, k in enumerate(budgets) if k > 0}  # uncommitted h^d

        def next_logits(depth: int, live: list[int], draft: Draft) -> torch.Tensor:
            nonlocal tails
            logits, tails = self._run_module(depth, [requests[i] for i in live], live, draft, tails)
            return logits

        return draft_chain(requests, budgets, next_logits)

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, self.model.config.hidden_size, dtype=self.model.dtype, device=self.model.device)

    @torch.inference_mode()
    def _run_module(self, d: int, reqs: list[RequestState], batch: list[int], draft: Draft,
                    tails: dict[int, torch.Tensor]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Module d over positions cached[d] .. n-2 of each request; logits [b, vocab] at n-2,
        and the module's outputs at positions that involve draft tokens (for module d+1)."""
        hs, toks, starts = [], [], []
        for req, i in zip(reqs, batch):
            st = self.states[req.request_id]
            n = len(req.all_ids)
            seq = req.all_ids + draft.tokens[i]  # committed, then the d draft tokens so far
            start = st.cached[d]
            hs.append(torch.cat([st.waiting[d], tails[i]]))  # h^d at positions start .. n-2
            toks.append(seq[start + d + 1 : n + d])  # t_{i+d+1} for those positions
            starts.append(start)
            assert hs[-1].shape[0] == len(toks[-1]) == n - 1 - start, "MTP state out of step"
        outs: list[torch.Tensor] = [self._empty()] * len(reqs)  # [m_j, H] per request
        logits: list[torch.Tensor] = [self._empty()] * len(reqs)
        rows = [r.row for r in reqs]
        for group in padded_groups(starts, [len(t) for t in toks], self.cache.capacity):
            o, lg = self._pass(d, [hs[j] for j in group], [toks[j] for j in group], [starts[j] for j in group],
                               [rows[j] for j in group])
            for g, j in enumerate(group):
                outs[j], logits[j] = o[g, : len(toks[j])], lg[g]
        new_tails = dict(tails)
        for j, (req, i) in enumerate(zip(reqs, batch)):
            st = self.states[req.request_id]
            c = max(0, len(req.all_ids) - 1 - d - st.cached[d])  # positions whose inputs are all committed
            st.waiting[d] = st.waiting[d][c:]
            st.cached[d] += c
            if d + 1 < self.mtp.num_modules:
                st.waiting[d + 1] = torch.cat([st.waiting[d + 1], outs[j][:c]])
            new_tails[i] = outs[j][c:]  # h^{d+1} at positions n-1-d .. n-2
        return torch.stack(logits), new_tails

    def _pass(self, d: int, hs: list[torch.Tensor], toks: list[list[int]], starts: list[int],
              rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One padded pass of module d: outputs [b, T, H] and logits at each row's last position [b, vocab]."""
        device = self.model.device
        b, t = len(toks), max(len(x) for x in toks)
        ids = torch.zeros(b, t, dtype=torch.long, device=device)
        hidden = torch.zeros(b, t, self.model.config.hidden_size, dtype=self.model.dtype, device=device)
        for j, (h, tk) in enumerate(zip(hs, toks)):
            ids[j, : len(tk)] = torch.tensor(tk, device=device)
            hidden[j, : len(tk)] = h
        start_t = torch.tensor(starts, device=device)  # [b]
        positions = start_t[:, None] + torch.arange(t, device=device)  # [b, T]
        step = partial_inputs(self.model, positions, self.cache, start_t, torch.tensor(rows, device=device))
        layer = self.mtp.layers[d]
        out = layer(self.model.model.embed_tokens(ids), hidden, step)  # [b, T, H]
        last = torch.tensor([len(tk) - 1 for tk in toks], device=device)
        final = out[torch.arange(b, device=device), last]  # [b, H]
        return out, self.model.head(layer.norm(final))  # [b, vocab]
