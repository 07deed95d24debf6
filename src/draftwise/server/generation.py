"""/v1/completions and /v1/chat/completions: validate, submit to the engine thread, answer.

Everything a request could get wrong is checked here, before anything is queued, so a
streaming request fails with a 4xx status rather than an error inside a 200 stream: a
structured-output constraint is compiled here too (`check_constraint`; the engine then
finds it in the grammar cache), so an invalid schema is a 400 naming its field.
Tool calls (toolcalls.py): the tools go to the chat template, `required` and a named
function become the request's grammar, and each choice's answer is split into content and
`tool_calls` (as it streams: `delta.tool_calls` once a call is complete).
A client that disconnects has its engine requests aborted (their cache rows freed).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from draftwise.config import one_line
from draftwise.constraints import StructuredOutputsParams, compile_constraint
from draftwise.errors import BadInput, RequestRefused
from draftwise.sampling import SamplingParams
from draftwise.server.engine_loop import Event, Submission
from draftwise.server.errors import APIError
from draftwise.server.logprobs import LogprobFormatter
from draftwise.server.protocol import BadField, ChatCompletionRequest, CompletionRequest, SamplingFields
from draftwise.server.state import ServerState
from draftwise.toolcalls import ToolCallParser, ToolInputError, ToolPlan, finish_reason, parse_tool_calls, plan_tools

DISCONNECTED = Event(-1, error="client disconnected", status=499)


# --- validation -----------------------------------------------------------------------------


def check_text_length(state: ServerState, chars: int, param: str) -> None:
    """Refuse text that cannot fit the context window before tokenizing it: a token covers
    at most `state.max_token_chars` characters, so `chars` need at least that many tokens."""
    if chars > state.max_token_chars * state.max_model_len:
        raise APIError(
            400, f"This model's maximum context length is {state.max_model_len} tokens; this prompt of {chars} "
                 f"characters needs at least {chars // state.max_token_chars} tokens. Please shorten it.",
            param=param, code="context_length_exceeded")


async def off_loop(fn, *args):
    """Run a slow call (tokenizing, rendering a chat template) in a worker thread, so the
    event loop keeps serving streams and /health meanwhile."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def check_prompt(state: ServerState, ids: list[int], max_tokens: int | None, param: str) -> int:
    """Validate one prompt's token ids with the engine's own checks (one wording, one
    place) and return the max_tokens it gets; a refusal is a 400 naming `param`."""
    try:
        return state.llm.engine.check_prompt(ids, max_tokens)
    except RequestRefused as e:
        raise APIError(400, str(e), param=param, code=e.code) from None


def check_token_ids(state: ServerState, params: list[SamplingParams]) -> None:
    """The token ids the sampling params name (logit_bias, stop_token_ids) are in the vocabulary."""
    try:
        for p in params:
            state.llm.engine.check_token_ids(p)
    except RequestRefused as e:
        raise APIError(400, str(e), param=e.param) from None


def sampling_params(body: SamplingFields, max_tokens: int, sample: int,
                    constraint: StructuredOutputsParams | None = None) -> SamplingParams:
    """The engine's SamplingParams of one choice (OpenAI defaults: temperature 1, top_p 1)."""
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(s == "" for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=top_k,
            min_p=body.min_p or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            seed=None if body.seed is None else (body.seed + sample) % 2**63,  # n samples differ
            stop=stops,
            stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=body.ignore_eos,
            min_tokens=body.min_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output,
            skip_special_tokens=body.skip_special_tokens,
            logit_bias={int(k): v for k, v in (body.logit_bias or {}).items()},
            logprobs=body.logprob_count(),
            sampling=body.sampling,
            structured_outputs=constraint,
        )
    except ValidationError as e:  # name the field at fault (e.g. logit_bias with a negative token id)
        loc = e.errors()[0]["loc"] if e.errors() else ()
        raise APIError(400, one_line(e), param=str(loc[0]) if loc else None) from None


def check_common(state: ServerState, body: SamplingFields) -> None:
    state.check_model(body.model)
    refused = body.unsupported()
    if refused is not None:
        param, message = refused
        raise APIError(400, message, param=param, code="unsupported_parameter")


def tool_plan(body: ChatCompletionRequest) -> ToolPlan | None:
    try:
        return plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
    except ToolInputError as e:
        raise APIError(400, str(e), param=e.param) from None


async def check_constraint(state: ServerState, body: SamplingFields, plan: ToolPlan | None = None) -> StructuredOutputsParams | None:
    """The request's constraint (its structured-output field, or the grammar of its tool
    calls), compiled once here so that a bad one is a 400 naming the field it came from."""
    try:
        spec, param = body.structured()
    except BadField as e:
        raise APIError(400, str(e), param=e.param) from None
    tools = plan.constraint(state.llm.tokenizer) if plan is not None else None
    if tools is not None:
        if spec is not None:
            raise APIError(400, f"tool_choice {plan.mode!r} constrains the answer to tool calls; it cannot be "
                                f"combined with {param}", param="tool_choice")
        spec, param = tools, "tools"
    if spec is None:
        return None
    config = state.llm.model.config
    try:
        await off_loop(compile_constraint, spec, state.llm.tokenizer, config.vocab_size, config.eos_token_ids)
    except BadInput as e:
        message = f"the tools' parameters do not compile to a grammar: {e}" if tools is not None else str(e)
        raise APIError(400, message, param=param) from None
    return spec


def submit(state: ServerState, prompts: list[list[int]], params: list[SamplingParams]) -> Submission:
    sub = Submission(asyncio.get_running_loop(), prompts, params)
    if len(prompts) > state.engine.capacity:
        raise APIError(400, f"this request asks for {len(prompts)} sequences (prompts x n); the server holds at "
                            f"most {state.engine.capacity} at once", param="n")
    if not state.engine.alive:
        raise APIError(503, "the engine is not running")
    if not state.engine.try_submit(sub):
        raise APIError(429, "the server's request queue is full; retry later", code="queue_full")
    return sub


# --- endpoints ------------------------------------------------------------------------------


async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = request.app.state.draftwise
    check_common(state, body)
    constraint = await check_constraint(state, body)
    prompts, params = [], []
    for p in body.prompts():
        if isinstance(p, str):
            check_text_length(state, len(p), "prompt")
        try:
            ids = await off_loop(state.llm.encode_prompt, p)
        except BadInput as e:
            raise APIError(400, str(e), param="prompt") from None
        max_tokens = check_prompt(state, ids, body.max_tokens if body.max_tokens is not None else 16, "prompt")
        for i in range(body.n):
            prompts.append(ids)
            params.append(sampling_params(body, max_tokens, i, constraint))
    check_token_ids(state, params)
    reply = Reply(state, body, "cmpl", "text_completion", prompts)
    sub = submit(state, prompts, params)
    if body.stream:
        return EngineStream(reply.stream(sub), lambda: state.engine.abort(sub))
    return await reply.collect(sub, request)


async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = request.app.state.draftwise
    check_common(state, body)
    plan = tool_plan(body)
    constraint = await check_constraint(state, body, plan)
    messages = [m.as_dict() for m in body.messages]
    check_text_length(state, sum(len(m["content"]) for m in messages), "messages")
    tools = plan.prompt_tools if plan is not None else None
    try:
        ids = await off_loop(lambda: state.llm.chat_prompt(messages, tools=tools))
    except BadInput as e:
        raise APIError(400, str(e), param="messages") from None
    except Exception as e:  # a template that rejects this conversation (e.g. role order)
        raise APIError(400, f"the chat template could not render these messages: {e}", param="messages") from None
    max_tokens = check_prompt(state, ids, body.token_limit(), "messages")
    prompts = [ids] * body.n
    params = [sampling_params(body, max_tokens, i, constraint) for i in range(body.n)]
    check_token_ids(state, params)
    reply = Reply(state, body, "chatcmpl", "chat.completion", prompts, plan)
    sub = submit(state, prompts, params)
    if body.stream:
        return EngineStream(reply.stream(sub), lambda: state.engine.abort(sub))
    return await reply.collect(sub, request)


class EngineStream(StreamingResponse):
    """An SSE response that aborts its engine requests however it ends (a no-op once they finished).

    The generator's own `finally` covers most disconnects; this also covers a client that
    leaves before the generator ever started.
    """

    def __init__(self, chunks: AsyncIterator[str], on_close) -> None:
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


# --- answers --------------------------------------------------------------------------------


class Reply:
    """Builds the OpenAI response (or stream of chunks) of one submission."""

    def __init__(self, state: ServerState, body: SamplingFields, prefix: str, kind: str, prompts: list[list[int]],
                 tools: ToolPlan | None = None) -> None:
        self.state, self.body, self.kind = state, body, kind
        self.chat = kind == "chat.completion"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompts = prompts
        self.n = len(prompts)
        # OpenAI counts each distinct prompt once, however many samples (n) it has
        self.prompt_tokens = sum(len(prompts[i]) for i in range(0, self.n, body.n))
        self.texts = [""] * self.n
        self.token_ids: list[list[int]] = [[] for _ in range(self.n)]
        self.finish: list[str | None] = [None] * self.n
        self.stats: list[dict | None] = [None] * self.n
        self.logprobs: list[list] = [[] for _ in range(self.n)]
        self.logprob_offsets = [0] * self.n  # characters of logprob tokens streamed so far (completions)
        self.format = LogprobFormatter(state.llm.tokenizer)
        self.tools = tools if tools is not None and tools.parses else None  # answers are parsed for calls
        self.parsers = [ToolCallParser(self.tools.names) for _ in range(self.n)] if self.tools else None

    def _record(self, ev: Event) -> None:
        self.texts[ev.index] += ev.text
        self.token_ids[ev.index] += ev.token_ids
        self.logprobs[ev.index] += ev.logprobs or []
        if ev.finished:
            self.finish[ev.index], self.stats[ev.index] = ev.finish_reason, ev.stats

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def usage(self) -> dict:
        completion = sum(len(t) for t in self.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def spec_summary(self, stats: list[dict]) -> dict:
        """Speculation stats summed over choices (the `draftwise` extension field)."""
        out = {"method": self.state.spec_method}
        keys = ("output_tokens", "target_passes", "drafts", "draft_tokens", "accepted_tokens")
        total = {k: sum(s.get(k, 0) for s in stats) for k in keys}
        out.update(total)
        if any(s.get("forced_drafted") for s in stats):
            out["forced_tokens"] = sum(s.get("forced_tokens", 0) for s in stats)
        drafted = total["draft_tokens"]
        out["acceptance_rate"] = round(total["accepted_tokens"] / drafted, 4) if drafted else 0.0
        decode_passes = total["target_passes"] - len(stats)
        out["mean_accepted_length"] = round((total["output_tokens"] - len(stats)) / decode_passes, 4) \
            if decode_passes > 0 else 1.0
        out["target_passes_per_token"] = round(total["target_passes"] / total["output_tokens"], 4) \
            if total["output_tokens"] else 0.0
        return out

    def _logprobs(self, i: int, items: list | None) -> dict | None:
        """The logprobs object of choice i's `items` (None when the request did not ask)."""
        if self.body.logprob_count() is None or items is None:
            return None
        if self.chat:
            return self.format.chat(items)
        out = self.format.completion(items, self.logprob_offsets[i])
        self.logprob_offsets[i] += sum(len(t) for t in out["tokens"])
        return out

    def _choice(self, i: int) -> dict:
        logprobs = self._logprobs(i, self.logprobs[i])
        if self.chat:
            message: dict = {"role": "assistant", "content": self.texts[i]}
            finish = self.finish[i]
            if self.tools is not None:
                message["content"], calls = parse_tool_calls(self.texts[i], self.tools)
                if calls:
                    message["tool_calls"] = calls
                finish = finish_reason(finish, calls)
            choice = {"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": i, "text": self.texts[i], "logprobs": logprobs, "finish_reason": self.finish[i]}
        if self.body.return_token_ids:
            choice["prompt_token_ids"], choice["token_ids"] = self.prompts[i], self.token_ids[i]
        return choice

    async def collect(self, sub: Submission, request: Request) -> Response:
        watcher = asyncio.create_task(_watch_disconnect(request, sub))
        try:
            while not self.done:
                ev = await sub.events.get()
                if ev is DISCONNECTED:
                    self.state.engine.abort(sub)
                    return Response(status_code=499)
                if ev.error is not None:
                    raise APIError(ev.status, ev.error)
                self._record(ev)
        finally:
            watcher.cancel()
            if not self.done:
                self.state.engine.abort(sub)
        body = {"id": self.id, "object": self.kind, "created": self.created, "model": self.state.model_name,
                "choices": [self._choice(i) for i in range(self.n)], "usage": self.usage(),
                "draftwise": self.spec_summary([s or {} for s in self.stats])}
        return JSONResponse(body)

    # --- streaming ------------------------------------------------------------------------

    def _chunk(self, choices: list[dict], **extra) -> str:
        data = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.state.model_name, "choices": choices}
        if self.include_usage:
            data["usage"] = None
        data.update(extra)
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def _delta(self, i: int, text: str | None, finish: str | None, role: bool = False,
               logprobs: list | None = None) -> dict:
        lp = self._logprobs(i, logprobs)
        if not self.chat:
            return {"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish}
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}

    @property
    def include_usage(self) -> bool:
        return bool(self.body.stream_options and self.body.stream_options.include_usage)

    async def stream(self, sub: Submission) -> AsyncIterator[str]:
        started = [False] * self.n
        try:
            while not self.done:
                ev = await sub.events.get()
                if ev.error is not None:
                    err = APIError(ev.status, ev.error).body()
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                self._record(ev)
                i = ev.index
                for piece in self._pieces(ev, started[i]):
                    yield piece
                started[i] = True
            else:
                if self.include_usage:
                    yield self._chunk([], usage=self.usage(),
                                      draftwise=self.spec_summary([s or {} for s in self.stats]))
            yield "data: [DONE]\n\n"
        finally:  # normal end, or cancelled because the client went away
            if not self.done:
                self.state.engine.abort(sub)

    def _pieces(self, ev: Event, started: bool) -> list[str]:
        i, out = ev.index, []
        extra = {}
        if self.body.return_token_ids:
            extra = {"token_ids": ev.token_ids}
        wants_logprobs = self.body.logprob_count() is not None and bool(ev.logprobs)
        if self.chat:
            text, calls = self._split(i, ev)
            if not started or text or (extra and ev.token_ids) or wants_logprobs:
                choice = self._delta(i, text, None, role=not started, logprobs=ev.logprobs)
                choice.update(extra)
                out.append(self._chunk([choice]))
            for call in calls:
                out.append(self._chunk([{"index": i, "delta": {"tool_calls": [call]}, "logprobs": None,
                                         "finish_reason": None}]))
            if ev.finished:
                finish = finish_reason(ev.finish_reason, self.parsers[i].calls) if self.parsers else ev.finish_reason
                out.append(self._chunk([self._delta(i, None, finish)],
                                       draftwise={"index": i, "method": self.state.spec_method, **(ev.stats or {})}))
            return out
        if ev.finished:
            choice = self._delta(i, ev.text, ev.finish_reason, logprobs=ev.logprobs)
            choice.update(extra)
            out.append(self._chunk([choice], draftwise={"index": i, "method": self.state.spec_method,
                                                        **(ev.stats or {})}))
        elif ev.text or not started or (extra and ev.token_ids) or wants_logprobs:
            choice = self._delta(i, ev.text, None, logprobs=ev.logprobs)
            choice.update(extra)
            out.append(self._chunk([choice]))
        return out


    def _split(self, i: int, ev: Event) -> tuple[str, list[dict]]:
        """The content to stream of this event, and the tool calls it completed (each as a
        `delta.tool_calls` item: index among the choice's calls, id, type, function)."""
        if self.parsers is None:
            return ev.text, []
        parser = self.parsers[i]
        before = len(parser.calls)
        text, calls = parser.feed(ev.text)
        if ev.finished:
            tail, last = parser.finish()
            text, calls = text + tail, calls + last
        return text, [{"index": before + k, **call} for k, call in enumerate(calls)]


async def _watch_disconnect(request: Request, sub: Submission) -> None:
    """Wake the waiting handler with DISCONNECTED when the client goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            sub.events.put_nowait(DISCONNECTED)
            return
