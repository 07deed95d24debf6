"""OpenAI-compatible HTTP server around the engine (needs the `server` extra: fastapi, uvicorn, prometheus_client).

`create_app(llm)` builds the app; `serve(app, host, port)` runs it under uvicorn with a
graceful drain; `ServerThread` runs it in a background thread.
"""

from draftwise.server.app import create_app
from draftwise.server.runner import ServerThread, serve

__all__ = ["create_app", "serve", "ServerThread"]
