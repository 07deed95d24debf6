"""Errors a user can cause and fix. The CLI prints them as one line and exits with 2."""

from __future__ import annotations


class DraftwiseError(Exception):
    """Base of every user-facing error: its message says what is wrong and what to do."""


class ModelNotFound(DraftwiseError):
    """Unknown model name or missing path."""


class CorruptModel(DraftwiseError):
    """A model file is unreadable, truncated, or fails its pinned sha256."""


class BadInput(DraftwiseError, ValueError):
    """A prompt or request the engine cannot serve (e.g. longer than the context window, an
    invalid JSON schema); a ValueError too, as vLLM raises for bad requests."""


class RequestRefused(BadInput):
    """A request the engine refuses before it is queued, naming the field at fault
    (`param`: prompt, logit_bias, stop_token_ids) and, for one too long for the context
    window, OpenAI's error code `context_length_exceeded`. The server answers it with a 400."""

    def __init__(self, message: str, param: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code
