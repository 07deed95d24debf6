"""The FastAPI app: `create_app(llm, ...)` wraps a loaded `LLM` in an OpenAI-compatible server.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics, POST /tokenize, POST /detokenize, GET /version, and the OpenAPI schema at
/openapi.json with its browsable docs at /docs. A guard in front of every route answers
503 while draining, 401 without the API key (when one is set; /health stays open), 413
for bodies over the size cap and 408 for bodies that take longer than `body_timeout`.
The engine thread starts and stops with the app.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from draftwise.errors import BadInput
from draftwise.server.engine_loop import EngineLoop
from draftwise.server.errors import APIError, install_error_handlers
from draftwise.server.generation import check_text_length, create_chat_completion, create_completion, off_loop
from draftwise.server.metrics import ServerMetrics
from draftwise.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from draftwise.server.settings import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_BYTES, ServerSettings
from draftwise.server.state import ServerState
from draftwise.version import __version__


def create_app(llm, *, served_model_name: str | None = None, api_key: str | None = None, max_queue: int = 64,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, shutdown_timeout: float = 30.0,
               body_timeout: float = DEFAULT_BODY_TIMEOUT) -> FastAPI:
    """An app serving `llm` (an `LLM`); no weights are loaded here."""
    spec = llm.speculative_config
    metrics = ServerMetrics(served_model_name or "draftwise", spec.num_speculative_tokens if spec else 0)
    if llm.engine.proposer is not None:
        metrics.watch(spec.method, llm.engine.proposer.report)
    state = ServerState(
        llm=llm, engine=EngineLoop(llm, metrics, max_queue), metrics=metrics,
        model_name=served_model_name or "draftwise", api_key=api_key or None, max_body_bytes=max_body_bytes,
        shutdown_timeout=shutdown_timeout, vocab_size=llm.model.config.vocab_size,
        max_model_len=llm.engine.max_model_len, spec_method=spec.method if spec else "none",
        max_token_chars=longest_token(llm.tokenizer), body_timeout=body_timeout,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.start()
        yield
        state.engine.stop()

    app = FastAPI(title="draftwise", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.draftwise = state
    install_error_handlers(app)
    add_routes(app, state)
    app.add_middleware(Guard, state=state)
    return app


def add_routes(app: FastAPI, state: ServerState) -> None:
    app.post("/v1/completions")(_completions)
    app.post("/v1/chat/completions")(_chat)

    @app.get("/health")
    async def health() -> Response:
        if not state.engine.alive:
            raise APIError(503, "the engine is not running")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created, "owned_by": "draftwise",
            "root": state.model_name, "max_model_len": state.max_model_len, "draftwise": state.serving(),
        }]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        tok = state.llm.tokenizer
        try:
            if body.messages is not None:
                messages = [{"role": m.role, "content": m.text()} for m in body.messages]
                check_text_length(state, sum(len(m["content"]) for m in messages), "messages")
                ids = await off_loop(state.llm.chat_prompt, messages)
            else:
                check_text_length(state, len(body.prompt), "prompt")
                ids = await off_loop(lambda: tok.encode(body.prompt, add_special_tokens=body.add_special_tokens))
        except BadInput as e:
            raise APIError(400, str(e)) from None
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        state.check_model(body.model)
        if any(not 0 <= t < state.vocab_size for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {state.vocab_size})", param="tokens")
        return {"prompt": state.llm.tokenizer.decode(body.tokens)}


async def _completions(body: CompletionRequest, request: Request) -> Response:
    return await create_completion(body, request)


async def _chat(body: ChatCompletionRequest, request: Request) -> Response:
    return await create_chat_completion(body, request)


class Guard:
    """ASGI middleware: drain (503), API key (401), body size cap (413), before any route runs."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st = self.state
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if st.draining:
            return await _send(send, scope, APIError(503, "the server is shutting down; retry elsewhere"))
        if st.api_key and scope["path"] != "/health" and not _authorized(headers.get("authorization"), st.api_key):
            return await _send(send, scope, APIError(401, "missing or incorrect API key (send 'Authorization: "
                                                          "Bearer <key>')", code="invalid_api_key"))
        declared = headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await _send(send, scope, APIError(400, "bad Content-Length header"))
            if size > st.max_body_bytes:
                return await _send(send, scope, _too_large(st.max_body_bytes))
        received, body_done = 0, False
        deadline = time.monotonic() + st.body_timeout

        async def limited_receive():
            nonlocal received, body_done
            if body_done:  # after the body: waiting for a disconnect may last as long as the answer
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body did not arrive within {st.body_timeout:g} seconds",
                               code="request_timeout") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > st.max_body_bytes:
                    raise _too_large(st.max_body_bytes)
            return message

        await self.app(scope, limited_receive, send)


def longest_token(tokenizer) -> int:
    """Characters of the vocabulary's longest token string (>= what one token decodes to)."""
    try:
        return max(8, max(len(t) for t in tokenizer.get_vocab()))
    except (AttributeError, TypeError, ValueError):
        return 1024


def _authorized(header: bytes | None, key: str) -> bool:
    if not header:
        return False
    scheme, _, token = header.decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


async def _send(send, scope, error: APIError) -> None:
    await error.response()(scope, None, send)


def build_app(settings: ServerSettings, progress: bool = True) -> FastAPI:
    """Load the engine the settings name and build the app serving it."""
    from draftwise.api import LLM

    llm = LLM(settings.model, dtype=settings.dtype, device=settings.device,
              speculative_config=settings.speculative_config, max_batch_size=settings.max_batch_size,
              max_model_len=settings.max_model_len, quantization=settings.quantization,
              revision=settings.revision, progress=progress)
    return create_app(llm, served_model_name=settings.served_model_name or settings.model,
                      api_key=settings.api_key, max_queue=settings.max_queue,
                      max_body_bytes=settings.max_body_bytes, shutdown_timeout=settings.shutdown_timeout,
                      body_timeout=settings.body_timeout)
