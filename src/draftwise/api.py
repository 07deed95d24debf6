"""The Python API, in the shape vLLM users know: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


from draftwise.config import SpeculativeConfig, parse_speculative_config
from draftwise.engine.controller import make_controller
from draftwise.engine.engine import Engine, StepOutput, context_window
from draftwise.errors import BadInput
from draftwise.models.build import DTYPES, default_device, load_model, parse_dtype  # noqa: F401 (the public API)
from draftwise.models.transformer import Transformer
from draftwise.sampling import SamplingParams, TokenLogprob
from draftwise.speculators import Target, build_proposer

@dataclass
class CompletionOutput:
    """One sample of a prompt (vLLM's name and fields)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stats: dict[str, Any] = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    """What one prompt gave: `outputs` holds its `SamplingParams.n` samples (as vLLM's);
    `text`, `token_ids`, `finish_reason`, `stats` and `logprobs` are the first sample's."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stats: dict[str, Any] = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None  # per output token, when SamplingParams.logprobs is set
    outputs: list[CompletionOutput] = field(default_factory=list)


class LLM:
    """Load a model once, then generate for batches of prompts (with speculation if configured).
    The context window is `max_model_len` (default: the model's, at most 8192 tokens)."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "bf16",
        device: str | None = None,
        speculative_config: str | dict | SpeculativeConfig | None = None,
        max_batch_size: int = 8,
        max_model_len: int | None = None,
        progress: bool = True,
        quantization: str = "none",
        revision: str | None = None,
    ) -> None:
        target, tokenizer = load_model(model, dtype, device, progress, quantization, revision)
        self._model_name = model
        self._setup(target, tokenizer, speculative_config, max_batch_size, max_model_len, dtype, progress)

    @classmethod
    def from_model(cls, model: Transformer, tokenizer, *, speculative_config=None, max_batch_size: int = 8,
                   max_model_len: int | None = None, draft_model: Transformer | None = None) -> "LLM":
        """Wrap an already built native model (tests, notebooks); `draft_model` serves a
        `draft_model` speculative config without loading one by name."""
        self = cls.__new__(cls)
        self._draft_model = draft_model
        self._setup(model, tokenizer, speculative_config, max_batch_size, max_model_len, model.dtype, False)
        return self

    def _setup(self, model, tokenizer, speculative_config, max_batch_size, max_model_len, dtype, progress) -> None:
        self.model, self.tokenizer = model, tokenizer
        self._settings = (max_batch_size, max_model_len, dtype, progress)
        self.set_speculation(speculative_config)

    def with_speculation(self, speculative_config: str | dict | SpeculativeConfig | None) -> "LLM":
        """Another LLM on the same loaded target (weights shared, its own engine, cache and
        speculator): methods compared side by side each keep their draft model and state."""
        other = type(self).__new__(type(self))
        other._draft_model = getattr(self, "_draft_model", None)
        other._model_name = getattr(self, "_model_name", "the target")
        other._setup(self.model, self.tokenizer, speculative_config, *self._settings)
        return other

    def set_speculation(self, speculative_config: str | dict | SpeculativeConfig | None) -> None:
        """Switch speculation (or turn it off with None), keeping the loaded target model."""
        max_batch_size, max_model_len, dtype, progress = self._settings
        model, tokenizer = self.model, self.tokenizer
        self.speculative_config = parse_speculative_config(speculative_config)
        if getattr(self, "engine", None) is not None:  # free the old KV caches and draft before allocating anew
            self.engine.close()
            self.engine = None
            gc.collect()
        spec = self.speculative_config
        max_len = context_window(model, max_model_len)
        target = Target(model, tokenizer, dtype, progress, max_batch_size, max_len, getattr(self, "_draft_model", None),
                        getattr(self, "_model_name", "the target"))
        proposer = build_proposer(spec, target) if spec else None
        self.engine = Engine(
            model, tokenizer,
            proposer=proposer,
            controller=make_controller(spec) if spec else None,
            max_batch_size=max_batch_size,
            max_model_len=max_len,
            max_speculative_tokens=spec.num_speculative_tokens if spec else 0,
        )

    def close(self) -> None:
        """Stop the speculator's background work and save its state (adaptive: the learned head)."""
        if getattr(self, "engine", None) is not None:
            self.engine.close()

    # --- generation ---------------------------------------------------------------------

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered with the tokenizer's chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadInput("this model's tokenizer has no chat template; pass a plain prompt instead")
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        on_output: Callable[[StepOutput], None] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise BadInput("give one SamplingParams, or one per prompt")
        groups = []  # per prompt, its n requests
        for p, sp in zip(prompts, per_prompt):
            ids = self.encode_prompt(p)
            groups.append([self.engine.add_request(ids, self._sample_params(sp, i)) for i in range(sp.n)])
        start = time.perf_counter()
        self.engine.run_until_done(on_output)
        elapsed = time.perf_counter() - start
        return [self._output(reqs, p, elapsed) for reqs, p in zip(groups, prompts)]

    @staticmethod
    def _sample_params(params: SamplingParams, index: int) -> SamplingParams:
        """Sample `index` of n: its own random stream (seed + index) when a seed is given."""
        if params.n == 1:
            return params
        seed = None if params.seed is None else (params.seed + index) % 2**63
        return params.model_copy(update={"n": 1, "seed": seed})

    def chat(self, conversations, sampling_params: SamplingParams | None = None, **kw) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of them."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([self.chat_prompt(c) for c in conversations], sampling_params, **kw)

    def _output(self, reqs, prompt, elapsed: float) -> RequestOutput:
        outs = []
        for i, req in enumerate(reqs):
            text = req.stop_text if req.stop_text is not None else self.tokenizer.decode(
                req.output_ids, skip_special_tokens=True)
            stats = req.stats.to_dict()
            stats["seconds"] = round(elapsed, 4)
            stats["tokens_per_second"] = round(len(req.output_ids) / elapsed, 3) if elapsed > 0 else 0.0
            outs.append(CompletionOutput(i, text, list(req.output_ids), req.finish_reason, stats,
                                         list(req.output_logprobs) if req.params.logprobs is not None else None))
        first = outs[0]
        return RequestOutput(reqs[0].request_id, prompt if isinstance(prompt, str) else None, reqs[0].prompt_ids,
                             first.text, first.token_ids, first.finish_reason, first.stats, first.logprobs, outs)
