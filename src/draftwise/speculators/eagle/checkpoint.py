"""Reading and writing EAGLE heads: the public EAGLE / EAGLE-3 layouts and ours.

Public layouts (a folder with `config.json` and the weights in `model.safetensors`,
`pytorch_model.bin`, or shards of either):

- EAGLE-1/2 (e.g. yuhuili/EAGLE-Vicuna-7B-v1.3): a Llama `config.json` with
  `num_hidden_layers: 1`; keys `fc.weight` [H, 2H], `fc.bias` [H],
  `layers.0.self_attn.{q,k,v,o}_proj.weight`, `layers.0.mlp.{gate,up,down}_proj.weight`,
  `layers.0.post_attention_layernorm.weight` (no input norm on layer 0), and often a
  copy of the target's `embed_tokens.weight`. The LM head is the target's.
- EAGLE-3 (e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B, SpecForge exports): `config.json`
  with `draft_vocab_size` (optionally `target_hidden_size`, and
  `eagle_config.eagle_aux_hidden_state_layer_ids`); keys `fc.weight` [H, 3H],
  `midlayer.self_attn.{q,k,v}_proj.weight` [*, 2H], `midlayer.self_attn.o_proj.weight`,
  `midlayer.mlp.*`, `midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight`,
  `norm.weight`, `lm_head.weight` [draft_vocab, H], `d2t` [draft_vocab] (offsets: target
  id = draft id + d2t) and `t2d` [vocab] (unused here). Some exports name the layer
  `layers.0.` or prefix everything with `model.`; both are accepted, and so is
  `norm_before_residual: true` (the residual is then hidden_norm(x)).

Ours (written by `draftwise train eagle`): `config.json` holding the `EagleConfig` under
`"draftwise_eagle"` (plus notes on the target and the training run) and
`model.safetensors` with the `EagleHead` state dict, in fp32, bf16, or int8: each matrix
as int8 rows with one fp32 scale per row (`NAME` and `NAME.int8_scale`, symmetric,
round to nearest), which halves a shipped head against bf16; `"weights"` in config.json
says which.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from draftwise.config import one_line
from draftwise.errors import BadInput
from draftwise.heads import SHIPPED, check_file
from draftwise.heads import resolve as resolve_head
from draftwise.speculators.eagle.head import EagleConfig, EagleHead, default_eagle3_layers

OURS_KEY = "draftwise_eagle"
WEIGHTS = "model.safetensors"
STORAGE = ("fp32", "bf16", "int8")
SCALE = ".int8_scale"


def save_eagle_head(head: EagleHead, folder: str | Path, extra: dict[str, Any] | None = None,
                    weights: str = "fp32") -> None:
    """Write `head` in our layout, its float tensors stored as `weights` (fp32, bf16 or
    int8 rows, see the module docstring); `extra` goes into config.json beside the config."""
    from safetensors.torch import save_file

    if weights not in STORAGE:
        raise BadInput(f"unknown weight storage {weights!r}; choose one of: {', '.join(STORAGE)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["DraftwiseEagleHead"], OURS_KEY: head.config.model_dump(), "weights": weights,
           **(extra or {})}
    state: dict[str, torch.Tensor] = {}
    for k, v in head.state_dict().items():
        v = v.detach().cpu()
        if not v.is_floating_point():
            state[k] = v.contiguous()
        elif weights == "int8" and v.dim() == 2:
            w = v.float()
            scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)  # [rows, 1]
            state[k] = (w / scale).round().clamp(-127, 127).to(torch.int8).contiguous()
            state[k + SCALE] = scale.squeeze(1).contiguous()
        else:
            state[k] = v.to(torch.bfloat16 if weights == "bf16" else torch.float32).contiguous()
    save_file(state, str(folder / WEIGHTS))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def _dequantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int8 rows with their scales back to fp32 matrices; other tensors as they are."""
    out = {}
    for k, v in state.items():
        if k.endswith(SCALE):
            continue
        scale = state.get(k + SCALE)
        out[k] = v.float() * scale.float()[:, None] if scale is not None else v
    return out


def _load_ours(folder: Path, path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return _dequantized(load_file(str(folder / WEIGHTS)))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BadInput(f"EAGLE head {path}: {WEIGHTS} cannot be read (truncated or corrupt?): {e}") from None


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors files in `folder`, else of its pytorch_model*.bin files."""
    from safetensors.torch import load_file

    from safetensors import SafetensorError

    files = sorted(folder.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    if files:
        for f in files:
            try:
                state.update(load_file(str(f)))
            except (SafetensorError, OSError) as e:
                raise BadInput(f"{f} cannot be read (truncated or corrupt?): {e}") from None
        return state
    bins = sorted(folder.glob("pytorch_model*.bin")) or sorted(folder.glob("*.bin")) or sorted(folder.glob("*.pt"))
    for f in bins:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    if not state:
        raise BadInput(f"{folder} holds no weights (*.safetensors or pytorch_model.bin)")
    return state


def _public_name(key: str) -> str:
    key = key.removeprefix("model.")
    if key.startswith("midlayer."):
        return "layer." + key[len("midlayer."):]
    if key.startswith("layers.0."):
        return "layer." + key[len("layers.0."):]
    return key


def _rope_scaling(cfg: dict) -> dict | None:
    sc = cfg.get("rope_scaling")
    if not sc or sc.get("rope_type", sc.get("type")) in (None, "default"):
        return None
    if sc.get("rope_type", sc.get("type")) not in ("linear", "llama3"):
        raise BadInput(f"EAGLE head rope scaling {sc!r} is not supported (linear, llama3 are)")
    return sc


def config_from_public(cfg: dict, state: dict[str, torch.Tensor], target) -> EagleConfig:
    """An EagleConfig for a public EAGLE-1/2 or EAGLE-3 checkpoint (names already mapped)."""
    tcfg = target.config
    h = int(cfg.get("hidden_size") or state["fc.weight"].shape[0])
    if any(k.startswith("layers.1.") for k in state):
        raise BadInput("EAGLE heads with more than one decoder layer are not supported")
    eagle3 = "layer.hidden_norm.weight" in state or "d2t" in state or state["fc.weight"].shape[1] != 2 * h
    heads = int(cfg.get("num_attention_heads") or tcfg.num_attention_heads)
    feature_size = int(cfg.get("target_hidden_size") or h)
    own_lm_head = "lm_head.weight" in state
    vocab = int(cfg.get("vocab_size") or tcfg.vocab_size)
    draft_vocab = int(state["lm_head.weight"].shape[0]) if own_lm_head else int(cfg.get("draft_vocab_size") or vocab)
    if eagle3:
        ids = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        layers = [max(0, int(i) - 1) for i in ids] if ids else default_eagle3_layers(tcfg.num_hidden_layers)
        if state["fc.weight"].shape[1] != len(layers) * feature_size:
            raise BadInput(f"EAGLE-3 fc takes {state['fc.weight'].shape[1]} inputs, not {len(layers)} x {feature_size}")
    else:
        layers = [tcfg.num_hidden_layers - 1]
    return EagleConfig(
        style="eagle3" if eagle3 else "eagle1",
        hidden_size=h,
        intermediate_size=int(cfg.get("intermediate_size") or state["layer.mlp.up_proj.weight"].shape[0]),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or h // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rope_scaling=_rope_scaling(cfg),
        attention_bias="layer.self_attn.q_proj.bias" in state,
        vocab_size=vocab,
        draft_vocab_size=draft_vocab,
        feature_layers=layers,
        feature_size=feature_size,
        feature_norm=not eagle3,
        fc_bias="fc.bias" in state,
        input_norm=eagle3 or "layer.input_layernorm.weight" in state,
        final_norm="norm.weight" in state,
        own_lm_head=own_lm_head,
        own_embedding=h != tcfg.hidden_size and "embed_tokens.weight" in state,
        norm_before_residual=eagle3 and bool(cfg.get("norm_before_residual", False)),
    )


def check_against_target(cfg: EagleConfig, target, where: str) -> None:
    tcfg = target.config
    if cfg.vocab_size != tcfg.vocab_size:
        raise BadInput(f"EAGLE head {where} was made for a {cfg.vocab_size}-token vocabulary; "
                       f"the target has {tcfg.vocab_size}")
    if cfg.feature_size != tcfg.hidden_size:
        raise BadInput(f"EAGLE head {where} reads {cfg.feature_size}-wide features; the target's hidden "
                       f"size is {tcfg.hidden_size}")
    if not cfg.own_embedding and cfg.hidden_size != tcfg.hidden_size:
        raise BadInput(f"EAGLE head {where} has hidden size {cfg.hidden_size} and no embedding of its own; "
                       f"the target's is {tcfg.hidden_size}")
    if cfg.target_num_hidden_layers not in (None, tcfg.num_hidden_layers):
        raise BadInput(f"EAGLE head {where} was made for a {cfg.target_num_hidden_layers}-layer target; "
                       f"this target has {tcfg.num_hidden_layers} layers")
    try:
        cfg.resolved_layers(tcfg.num_hidden_layers)
    except ValueError as e:
        raise BadInput(f"EAGLE head {where}: {e}") from None


def load_eagle_head(path: str | Path, target) -> EagleHead:
    """A head from a folder in our layout or a public EAGLE / EAGLE-3 layout, or a shipped
    head by name (`draftwise.heads`), checked against the target and moved to its device
    and dtype."""
    folder = resolve_head(path)
    if str(path) in SHIPPED and (why := check_file(SHIPPED[str(path)])) is not None:
        raise BadInput(why)
    if not (folder / "config.json").is_file():
        raise BadInput(f"{path} is not an EAGLE head folder (no config.json) nor a shipped head "
                       f"({', '.join(n for n, h in SHIPPED.items() if h.method == 'eagle')})")
    try:
        cfg_json = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"EAGLE head {path}: config.json is not valid JSON ({e})") from None
    if OURS_KEY in cfg_json:
        try:
            cfg = EagleConfig.model_validate(cfg_json[OURS_KEY])
        except ValidationError as e:
            raise BadInput(f"EAGLE head {path}: bad config.json: {one_line(e)}") from None
        state = _load_ours(folder, path)
    else:
        state = read_state_dict(folder)
        state = {_public_name(k): v for k, v in state.items()}
        if "fc.weight" not in state:
            raise BadInput(f"{path} is not an EAGLE head (no fc.weight)")
        cfg = config_from_public(cfg_json, state, target)
        drop = {"t2d"} | ({"embed_tokens.weight"} if not cfg.own_embedding else set())
        drop |= {"d2t"} if not cfg.reduced_vocab else set()  # full draft vocabulary: offsets all zero
        state = {k: v for k, v in state.items() if k not in drop}
    check_against_target(cfg, target, str(path))
    head = EagleHead(cfg)
    if "d2t" in state:
        state["d2t"] = state["d2t"].long()
    try:
        missing, unexpected = head.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape than the config says
        raise BadInput(f"EAGLE head {path}: weights do not match its config.json: {str(e).splitlines()[-1]}") from None
    if missing or unexpected:
        raise BadInput(f"EAGLE head {path}: missing weights {missing[:4]}, unexpected {unexpected[:4]}")
    return head.to(device=target.device, dtype=target.dtype).eval()
