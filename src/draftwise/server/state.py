"""What every route of one server reads: the loaded LLM, its engine thread, metrics and limits.

`create_app` (server/app.py) builds one ServerState per app; the handlers
(server/generation.py) find it at `request.app.state.draftwise`. Draining (SIGTERM) is
kept here too: `begin_drain` closes the door, `drained` says when the server may exit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from draftwise.models.build import dtype_name
from draftwise.server.engine_loop import EngineLoop
from draftwise.server.errors import APIError
from draftwise.server.metrics import ServerMetrics
from draftwise.server.settings import DEFAULT_BODY_TIMEOUT

if TYPE_CHECKING:
    from draftwise.api import LLM


@dataclass
class ServerState:
    llm: LLM
    engine: EngineLoop
    metrics: ServerMetrics
    model_name: str
    api_key: str | None
    max_body_bytes: int
    shutdown_timeout: float
    vocab_size: int
    max_model_len: int
    spec_method: str
    max_token_chars: int = 1024  # characters of the longest token (what one token can cover at most)
    body_timeout: float = DEFAULT_BODY_TIMEOUT  # seconds a request body may take to arrive
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    drain_deadline: float = 0.0
    drain_aborted: bool = False

    def serving(self) -> dict[str, str]:
        """What this server runs: the weights' quantization, compute dtype, device and
        speculator (in the start line and in /v1/models)."""
        model = self.llm.model
        return {"quantization": getattr(model, "quantization", "none"), "dtype": dtype_name(model.dtype),
                "device": str(model.device), "speculator": self.spec_method}

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def begin_drain(self) -> None:
        """Stop accepting requests (503); in-flight ones get `shutdown_timeout` seconds to finish."""
        if not self.draining:
            self.drain_deadline = time.monotonic() + self.shutdown_timeout
            self.draining = True

    def drained(self) -> bool:
        """True once draining and nothing is in flight; past the deadline, abort what is left."""
        if not self.draining:
            return False
        if self.engine.in_flight == 0 or not self.engine.alive:
            return True
        now = time.monotonic()
        if now >= self.drain_deadline and not self.drain_aborted:
            self.drain_aborted = True
            self.engine.abort_all("the server shut down before this request finished (shutdown timeout)")
        return now >= self.drain_deadline + 2.0
