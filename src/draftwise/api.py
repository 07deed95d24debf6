"""The Python API, in the shape vLLM users know: `LLM(model=...).generate(prompts, SamplingParams(...))`.

vLLM code runs with only its import line changed: its engine arguments that mean something
here are taken (`model, tokenizer, dtype, seed, max_model_len, quantization,
speculative_config, max_num_seqs, revision`), the others are refused by name with what to
use instead (`VLLM_REFUSED`); prompts may be strings, token ids or vLLM's prompt dicts.
Structured output is vLLM's `SamplingParams(structured_outputs=StructuredOutputsParams(...))`;
tool calls are `LLM.chat(..., tools=..., tool_choice=...)` (the format: toolcalls.py).
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable, Sequence

from tqdm import tqdm

from draftwise.config import SpeculativeConfig, parse_speculative_config
from draftwise.constraints import compile_constraint
from draftwise.engine.controller import make_controller
from draftwise.engine.engine import Engine, StepOutput, context_window
from draftwise.errors import BadInput
from draftwise.models.build import load_model, load_tokenizer
from draftwise.models.transformer import Transformer
from draftwise.outputs import CompletionOutput, RequestOutput, completion  # noqa: F401 (the public API)
from draftwise.sampling import SamplingParams
from draftwise.speculators import Target, build_proposer
from draftwise.toolcalls import (ToolPlan, fallback_messages, has_tool_messages, parse_tool_calls, plan_tools,
                                 renders_tools, template_messages)

# vLLM engine arguments with no meaning here: the value that is what draftwise does anyway
# (accepted), and what to use instead of any other value
_ONE_PROCESS = "draftwise runs one model per process; scale out with `draftwise serve --replicas N` (Ray Serve)"
VLLM_REFUSED: dict[str, tuple[Any, str]] = {
    "tensor_parallel_size": (1, _ONE_PROCESS),
    "pipeline_parallel_size": (1, _ONE_PROCESS),
    "data_parallel_size": (1, _ONE_PROCESS),
    "distributed_executor_backend": (None, _ONE_PROCESS),
    "gpu_memory_utilization": (None, "the KV cache holds max_num_seqs x max_model_len tokens; set those instead"),
    "swap_space": (None, "draftwise keeps every running request's cache in memory; lower max_num_seqs instead"),
    "cpu_offload_gb": (None, "draftwise does not offload weights; use quantization (e.g. 'w4a8-all') to shrink them"),
    "kv_cache_dtype": ("auto", "the KV cache takes the model's dtype; choose it with dtype"),
    "block_size": (None, "draftwise's KV cache is one contiguous row per request, not paged"),
    "enable_prefix_caching": (False, "draftwise does not share prefixes between requests"),
    "max_num_batched_tokens": (None, "prompts are prefilled in full; limit the batch with max_num_seqs"),
    "enforce_eager": (True, "draftwise always runs eagerly (no CUDA graphs); leave it out"),
    "trust_remote_code": (False, "draftwise runs no model code from the Hub; it reads the supported "
                                 "architectures' weights itself"),
    "tokenizer_mode": ("auto", "the tokenizer is the model's (transformers' fast one)"),
    "tokenizer_revision": (None, "the tokenizer comes at the model's revision"),
    "download_dir": (None, "models go to the standard Hugging Face cache; set HF_HOME to move it"),
    "hf_token": (None, "log in with `hf auth login` or set HF_TOKEN"),
    "enable_lora": (False, "draftwise serves no LoRA adapters; merge the adapter into the weights"),
    "task": ("generate", "draftwise generates text only"),
    "load_format": ("auto", "draftwise reads safetensors and GGUF by itself"),
    "disable_log_stats": (None, "draftwise logs no engine stats from LLM; read RequestOutput.stats"),
}
VLLM_DTYPES = {"auto": "bf16", "half": "fp16", "float": "fp32"}  # vLLM's spellings beside ours


def check_vllm_arguments(kwargs: dict[str, Any]) -> None:
    """Refuse, by name, engine arguments that have no meaning here (unless they ask for what
    draftwise does anyway) and names that are not arguments at all."""
    for name, value in kwargs.items():
        if name not in VLLM_REFUSED:
            raise BadInput(f"LLM() got an unknown argument {name!r}")
        neutral, instead = VLLM_REFUSED[name]
        if neutral is None or value != neutral:
            raise BadInput(f"LLM(): {name} is not supported: {instead}")


class LLM:
    """Load a model once, then generate for batches of prompts (with speculation if configured).
    The context window is `max_model_len` (default: the model's, at most 8192 tokens)."""

    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        dtype: str = "auto",
        seed: int | None = None,
        device: str | None = None,
        speculative_config: str | dict | SpeculativeConfig | None = None,
        max_batch_size: int | None = None,
        max_num_seqs: int | None = None,
        max_model_len: int | None = None,
        progress: bool = True,
        quantization: str | None = None,
        revision: str | None = None,
        **vllm_arguments: Any,
    ) -> None:
        """`dtype`: bf16 / fp32 / fp16 (or vLLM's auto = bf16, half, float); `max_num_seqs`
        (vLLM) or `max_batch_size`: requests decoded together (default 8); `seed`: requests
        without a seed get seeds drawn from it (reproducible runs); `tokenizer`: another
        tokenizer than the model's (a folder or Hub id)."""
        check_vllm_arguments(vllm_arguments)
        if max_batch_size is not None and max_num_seqs is not None and max_batch_size != max_num_seqs:
            raise BadInput("give max_num_seqs or max_batch_size (the same thing), not two different values")
        batch = max_num_seqs or max_batch_size or 8
        dtype = VLLM_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        target, tok = load_model(model, dtype, device, progress, quantization or "none", revision)
        if tokenizer is not None and tokenizer != model:
            tok = load_tokenizer(tokenizer, revision)
        self._model_name = model
        self._seed = seed
        self._setup(target, tok, speculative_config, batch, max_model_len, dtype, progress)

    @classmethod
    def from_model(cls, model: Transformer, tokenizer, *, speculative_config=None, max_batch_size: int = 8,
                   max_model_len: int | None = None, draft_model: Transformer | None = None,
                   seed: int | None = None) -> "LLM":
        """Wrap an already built native model (tests, notebooks); `draft_model` serves a
        `draft_model` speculative config without loading one by name."""
        self = cls.__new__(cls)
        self._draft_model = draft_model
        self._seed = seed
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
        other._seed = self._seed
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
            seed=self._seed,
        )

    def close(self) -> None:
        """Stop the speculator's background work and save its state (adaptive: the learned head)."""
        if getattr(self, "engine", None) is not None:
            self.engine.close()

    def pause_background(self) -> None:
        """Hold the speculator's background work (an adaptive learner's training) until
        `resume_background`; returns once none runs. The bench holds every method but the
        one it times, so no method's work runs on another's clock."""
        if getattr(self, "engine", None) is not None and self.engine.proposer is not None:
            self.engine.proposer.pause()

    def resume_background(self) -> None:
        """Let the speculator's background work go on after `pause_background`."""
        if getattr(self, "engine", None) is not None and self.engine.proposer is not None:
            self.engine.proposer.resume()

    # --- generation ---------------------------------------------------------------------

    def encode_prompt(self, prompt: str | Sequence[int] | dict[str, Any]) -> list[int]:
        """A prompt as token ids: a string, token ids, or vLLM's {"prompt": ...} /
        {"prompt_token_ids": [...]}."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return self.encode_prompt(prompt["prompt"])
            raise BadInput(f"a prompt dict needs 'prompt' or 'prompt_token_ids' (got keys {sorted(prompt)})")
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def chat_prompt(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False, chat_template: str | None = None,
                    chat_template_kwargs: dict[str, Any] | None = None,
                    tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a conversation rendered with the tokenizer's chat template (or
        `chat_template`); `chat_template_kwargs` go to the template (e.g. Qwen3's
        {"enable_thinking": False}). `tools` (checked OpenAI function tools) go to a
        template that renders them, else into toolcalls.py's fallback system message."""
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise BadInput("this model's tokenizer has no chat template; pass a plain prompt instead")
        if continue_final_message and add_generation_prompt:
            raise BadInput("continue_final_message needs add_generation_prompt=False")
        options = dict(add_generation_prompt=add_generation_prompt, tokenize=False,
                       continue_final_message=continue_final_message, chat_template=chat_template,
                       **(chat_template_kwargs or {}))
        messages = list(messages)
        if tools or has_tool_messages(messages):
            if self.template_renders_tools(chat_template):
                messages = template_messages(messages)
                if tools:
                    options["tools"] = list(tools)
            else:
                messages = fallback_messages(messages, tools)
        try:
            text = self.tokenizer.apply_chat_template(messages, **options)
        except Exception as e:  # noqa: BLE001 - jinja and transformers raise many kinds
            raise BadInput(f"the chat template failed on these messages: {e}") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def template_renders_tools(self, chat_template: str | None = None) -> bool:
        """Does the chat template (the tokenizer's, or `chat_template`) render tools?
        Asked once per template."""
        template = chat_template if chat_template is not None else self.tokenizer.chat_template
        known = self.__dict__.setdefault("_tool_templates", {})
        key = str(template)
        if key not in known:
            def render(messages, tools):
                return self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                          tokenize=False, chat_template=chat_template)
            try:
                known[key] = renders_tools(render)
            except Exception:  # noqa: BLE001 - a template that fails on the probe cannot take tools either
                known[key] = False
        return known[key]

    def generate(
        self,
        prompts: str | Sequence[int] | dict[str, Any] | Sequence[str | Sequence[int] | dict[str, Any]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
        on_output: Callable[[StepOutput], None] | None = None,
        lora_request: None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (strings, token ids or prompt dicts) with its sampling
        params (one for all, or one each; default vLLM's: temperature 1.0, 16 tokens)."""
        if lora_request is not None:
            raise BadInput(VLLM_REFUSED["enable_lora"][1])
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params if sampling_params is not None else SamplingParams()
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise BadInput("give one SamplingParams, or one per prompt")
        groups = []  # per prompt, its n requests
        for p, sp in zip(prompts, per_prompt):
            ids = self.encode_prompt(p)
            groups.append([self.engine.add_request(ids, self._sample_params(sp, i)) for i in range(sp.n)])
        bar = tqdm(total=sum(len(g) for g in groups), desc="generating", unit="request", disable=not use_tqdm)

        def seen(out: StepOutput) -> None:
            if out.finished:
                bar.update(1)
            if on_output is not None:
                on_output(out)

        start = time.perf_counter()
        try:
            self.engine.run_until_done(seen)
        finally:
            bar.close()
        elapsed = time.perf_counter() - start
        return [self._output(reqs, p, elapsed) for reqs, p in zip(groups, prompts)]

    @staticmethod
    def _sample_params(params: SamplingParams, index: int) -> SamplingParams:
        """Sample `index` of n: its own random stream (seed + index) when a seed is given."""
        if params.n == 1:
            return params
        seed = None if params.seed is None else (params.seed + index) % 2**63
        return params.model_copy(update={"n": 1, "seed": seed})

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             use_tqdm: bool = False, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict[str, Any] | None = None,
             on_output: Callable[[StepOutput], None] | None = None, tools: Sequence[dict[str, Any]] | None = None,
             tool_choice: str | dict[str, Any] | None = None,
             parallel_tool_calls: bool | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of them, vLLM's arguments.

        `tools` (OpenAI function tools), `tool_choice` ("auto" by default, "none",
        "required" or {"type": "function", "function": {"name": ...}}) and
        `parallel_tool_calls` as in OpenAI's API: "required" and a named function are
        enforced by a grammar. Each CompletionOutput's `tool_calls` then holds the calls
        parsed from its text (OpenAI's shape; the text stays the model's whole answer)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        plan = plan_tools(tools, tool_choice, parallel_tool_calls)
        sampling_params = self._with_tool_grammar(sampling_params, plan)
        ids = [self.chat_prompt(c, add_generation_prompt=add_generation_prompt,
                                continue_final_message=continue_final_message, chat_template=chat_template,
                                chat_template_kwargs=chat_template_kwargs,
                                tools=plan.prompt_tools if plan else None) for c in conversations]
        outputs = self.generate(ids, sampling_params, use_tqdm=use_tqdm, on_output=on_output)
        if plan is not None and plan.parses:
            for out in outputs:
                for sample in out.outputs:
                    sample.tool_calls = parse_tool_calls(sample.text, plan)[1]
        return outputs

    def _with_tool_grammar(self, sampling_params, plan: ToolPlan | None):
        """The sampling params with the grammar of `required` / named tool calls (checked here)."""
        grammar = plan.constraint(self.tokenizer) if plan is not None else None
        if grammar is None:
            return sampling_params
        params = sampling_params if sampling_params is not None else SamplingParams()
        many = isinstance(params, Sequence)
        if any(p.structured_outputs is not None for p in (params if many else [params])):
            raise BadInput(f"tool_choice {plan.mode!r} constrains the answer to tool calls; it cannot be combined "
                           f"with structured_outputs")
        config = self.model.config
        try:
            compile_constraint(grammar, self.tokenizer, config.vocab_size, config.eos_token_ids)
        except BadInput as e:
            raise BadInput(f"tools: the functions' parameters do not compile to a grammar: {e}") from None
        update = {"structured_outputs": grammar}
        return [p.model_copy(update=update) for p in params] if many else params.model_copy(update=update)

    def _output(self, reqs, prompt, elapsed: float) -> RequestOutput:
        outs = []
        for i, req in enumerate(reqs):
            text = req.stop_text if req.stop_text is not None else self.tokenizer.decode(
                req.output_ids, skip_special_tokens=req.params.skip_special_tokens)
            stats = req.stats.to_dict()
            stats["seconds"] = round(elapsed, 4)
            stats["tokens_per_second"] = round(len(req.output_ids) / elapsed, 3) if elapsed > 0 else 0.0
            outs.append(completion(i, req, text, stats, self._decode_one))
        first, req = outs[0], reqs[0]
        text_prompt = prompt if isinstance(prompt, str) else prompt.get("prompt") if isinstance(prompt, dict) else None
        return RequestOutput(req.request_id, text_prompt, req.prompt_ids, first.text, first.token_ids,
                             first.finish_reason, first.stats,
                             list(req.output_logprobs) if req.params.logprobs is not None else None, outs)

    def _decode_one(self, token: int) -> str:
        return self.tokenizer.decode([token])
