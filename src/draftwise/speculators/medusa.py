"""`medusa`: Medusa-1 heads on the target's last hidden state propose a token tree.

Head i maps the final-normed hidden state h of the last token the target ran to the
token i+1 places after the bonus token: h -> (x + SiLU(W x + b), `num_layers` times) ->
LM head (the head's own weight, or the target's). The tree's root is the last committed
token (the target's bonus / recovered token); a node at depth d with rank r holds the
rank-r token of head d-1, whatever its parent (Medusa's candidates). The shape is
`SpeculativeConfig.tree` (choice paths) or a small default (24 nodes), cut to the
engine's node budget (`num_speculative_tokens` counts tree nodes, so set it to the tree
size, e.g. 16-24) and to the number of heads. Tree nodes are point-mass candidates, verified
losslessly by the engine (greedy or recursive rejection sampling); heads never change
the output, only how many tokens a target pass commits.

The engine reports hidden states of the last target layer *before* the final norm; the
public heads were trained on the normed state (the HF model output), so the target's
`model.norm` is applied here.

Checkpoints (`SpeculativeConfig.model` = a folder):

- public Medusa layout: `config.json` with `medusa_num_heads`, `medusa_num_layers`, and
  `medusa_lm_head.safetensors` or `medusa_lm_head.pt` holding the state dict of the head
  list: `{i}.{j}.linear.weight` [H, H], `{i}.{j}.linear.bias` [H] for j < num_layers, and
  `{i}.{num_layers}.weight` [V, H]. A full-model checkpoint (`*.safetensors`) whose keys
  start with `medusa_head.` is read the same way.
- ours: `medusa.json` {"format": "draftwise-medusa", "num_heads", "num_layers",
  "own_lm_head", "hidden_size", "vocab_size"} and `medusa.safetensors` with `blocks.{i}.{j}.weight` [H, H],
  `blocks.{i}.{j}.bias` [H], and `lm_heads.{i}.weight` [V, H] when own_lm_head
  (`save_medusa` writes it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from draftwise.config import SpeculativeConfig
from draftwise.errors import BadInput
from draftwise.models.transformer import padded_linear
from draftwise.request import RequestState
from draftwise.speculators.base import Draft, Proposer, Target, register
from draftwise.tree import TreeShape, default_tree

OURS_CONFIG, OURS_WEIGHTS = "medusa.json", "medusa.safetensors"


class MedusaHeads(nn.Module):
    """`num_heads` heads of `num_layers` residual SiLU blocks and an LM head each."""

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int, num_layers: int = 1,
                 own_lm_head: bool = True) -> None:
        super().__init__()
        self.num_heads, self.num_layers, self.own_lm_head = num_heads, num_layers, own_lm_head
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.blocks = nn.ModuleList(
            nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_layers)) for _ in range(num_heads)
        )
        self.lm_heads = nn.ModuleList(
            nn.Linear(hidden_size, vocab_size, bias=False) for _ in range(num_heads if own_lm_head else 0)
        )

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, shared_head: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, hidden] (final-normed) -> logits [num_heads, n, vocab]."""
        out = []
        for i in range(self.num_heads):
            h = x
            for block in self.blocks[i]:
                h = h + F.silu(padded_linear(h, block.weight, block.bias))
            w = self.lm_heads[i].weight if self.own_lm_head else shared_head
            if w is None:
                raise ValueError("heads without their own LM head need the target's")
            out.append(padded_linear(h, w, None))
        return torch.stack(out)


# --- checkpoints ------------------------------------------------------------------------


def save_medusa(heads: MedusaHeads, folder: str | Path) -> None:
    """Write `heads` in our layout (see the module docstring)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"format": "draftwise-medusa", "num_heads": heads.num_heads, "num_layers": heads.num_layers,
           "own_lm_head": heads.own_lm_head, "hidden_size": heads.hidden_size, "vocab_size": heads.vocab_size}
    (folder / OURS_CONFIG).write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(folder / OURS_WEIGHTS))


def _public_state(folder: Path) -> dict[str, torch.Tensor]:
    """The head list's state dict from a public Medusa checkpoint, prefix stripped."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if (folder / "medusa_lm_head.safetensors").exists():
        sd = load_file(str(folder / "medusa_lm_head.safetensors"))
    elif (folder / "medusa_lm_head.pt").exists():
        sd = torch.load(folder / "medusa_lm_head.pt", map_location="cpu", weights_only=True)
    else:
        sd = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    if k.startswith("medusa_head."):
                        sd[k] = fh.get_tensor(k)
        if not sd:
            raise BadInput(f"{folder} has no Medusa heads (medusa_lm_head.safetensors / .pt, or medusa_head.* weights)")
    return {k.removeprefix("medusa_head."): v for k, v in sd.items()}


def _from_public(folder: Path, cfg: dict) -> MedusaHeads:
    n_heads, n_layers = int(cfg["medusa_num_heads"]), int(cfg.get("medusa_num_layers", 1))
    sd = _public_state(folder)
    present = sorted({int(k.split(".")[0]) for k in sd if k.split(".")[0].isdigit()})
    n_heads = min(n_heads, len(present))  # a config may list more heads than were saved
    try:
        w0 = sd[f"0.{n_layers}.weight"]
        heads = MedusaHeads(w0.shape[1], w0.shape[0], n_heads, n_layers, own_lm_head=True)
        ours = {}
        for i in range(n_heads):
            for j in range(n_layers):
                ours[f"blocks.{i}.{j}.weight"] = sd[f"{i}.{j}.linear.weight"]
                ours[f"blocks.{i}.{j}.bias"] = sd[f"{i}.{j}.linear.bias"]
            ours[f"lm_heads.{i}.weight"] = sd[f"{i}.{n_layers}.weight"]
    except KeyError as e:
        raise BadInput(f"Medusa checkpoint {folder} lacks {e.args[0]!r} (medusa_num_layers={n_layers})") from None
    heads.load_state_dict(ours, strict=True)
    return heads


def load_medusa(path: str | Path) -> MedusaHeads:
    """Heads from a folder in the public Medusa layout or ours."""
    from safetensors.torch import load_file

    folder = Path(path)
    if (folder / OURS_CONFIG).exists():
        cfg = json.loads((folder / OURS_CONFIG).read_text())
        sd = load_file(str(folder / OURS_WEIGHTS))
        heads = MedusaHeads(int(cfg["hidden_size"]), int(cfg["vocab_size"]), int(cfg["num_heads"]),
                            int(cfg["num_layers"]), bool(cfg.get("own_lm_head", True)))
        heads.load_state_dict(sd, strict=True)
        return heads
    if (folder / "config.json").exists():
        cfg = json.loads((folder / "config.json").read_text())
        if "medusa_num_heads" in cfg:
            return _from_public(folder, cfg)
    raise BadInput(f"{path} is not a Medusa checkpoint (no {OURS_CONFIG}, nor config.json with medusa_num_heads)")


# --- the proposer -----------------------------------------------------------------------


@register
class MedusaProposer(Proposer):
    name = "medusa"
    drafts_trees = True
    hidden_layers = (-1,)

    def __init__(self, model, heads: MedusaHeads, tree: TreeShape | None = None) -> None:
        if heads.hidden_size != model.config.hidden_size:
            raise BadInput(f"Medusa heads expect hidden size {heads.hidden_size}, the target has "
                           f"{model.config.hidden_size}")
        if heads.own_lm_head and heads.vocab_size != model.head_weight.shape[0]:
            raise BadInput(f"Medusa heads predict over {heads.vocab_size} tokens, the target over "
                           f"{model.head_weight.shape[0]}")
        self.model = model
        self.heads = heads.to(device=model.device, dtype=model.dtype).eval()
        self.tree = (tree or default_tree()).truncate(max_depth=heads.num_heads)
        self.last_hidden: dict[str, torch.Tensor] = {}  # request id -> [hidden] of its last target-run token

    @classmethod
    def max_tree_depth(cls, config: SpeculativeConfig) -> int | None:
        """A configured tree's longest path; the default tree is bounded by the budget only."""
        return max(len(p) for p in config.tree) if config.tree else None

    @classmethod
    def from_config(cls, config: SpeculativeConfig, target: Target) -> "MedusaProposer":
        if isinstance(target.draft_model, MedusaHeads):
            heads = target.draft_model
        elif config.model:
            heads = load_medusa(config.model)
        else:
            raise BadInput("speculator medusa needs heads: --draft-model PATH (a Medusa checkpoint folder)")
        tree = TreeShape.from_paths(config.tree) if config.tree is not None else None
        return cls(target.model, heads, tree)

    def on_hidden(self, request: RequestState, hidden: dict[int, torch.Tensor]) -> None:
        h = next(iter(hidden.values()))  # [n, hidden]: the last layer, before the final norm
        self.last_hidden[request.request_id] = h[-1]

    def end(self, request: RequestState) -> None:
        self.last_hidden.pop(request.request_id, None)

    @torch.inference_mode()
    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pre-norm hidden [n, H] -> Medusa logits [num_heads, n, vocab]."""
        return self.heads(self.model.model.norm(hidden), self.model.head_weight)

    def propose(self, requests: Sequence[RequestState], num_tokens: Sequence[int]) -> Draft:
        draft = Draft.empty(len(requests))
        active = [i for i, k in enumerate(num_tokens) if k > 0 and requests[i].request_id in self.last_hidden]
        if not active or not len(self.tree):
            return draft
        shapes = {i: self.tree.truncate(num_tokens[i]) for i in active}
        need = [max((s.ranks_needed()[d] if d < s.max_depth else 0) for s in shapes.values())
                for d in range(self.tree.max_depth)]
        hidden = torch.stack([self.last_hidden[requests[i].request_id] for i in active])  # [n, H]
        logits = self.head_logits(hidden)  # [heads, n, vocab]
        vocab = logits.shape[-1]
        top = [logits[d].topk(min(max(k, 1), vocab), dim=-1).indices.tolist() for d, k in enumerate(need)]  # [n, k]
        for j, i in enumerate(active):
            candidates = [top[d][j] for d in range(shapes[i].max_depth)]
            tokens, parents = shapes[i].fill(candidates)
            draft.tokens[i], draft.parents[i] = tokens, parents
        return draft
