"""What a server is made of: the model, its speculation and the API's limits.

`server/app.py: build_app(settings)` loads the engine and builds the app from them.
`draftwise serve` builds its one app this way, and so does every Ray Serve replica
(server/ray_serve.py), which receives the settings as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_BODY_TIMEOUT = 30.0


@dataclass
class ServerSettings:
    model: str
    dtype: str = "bf16"
    device: str | None = None
    quantization: str = "none"
    revision: str | None = None
    max_batch_size: int = 8
    max_model_len: int | None = None
    speculative_config: dict | None = None
    served_model_name: str | None = None
    api_key: str | None = None
    max_queue: int = 64
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_timeout: float = 30.0
    body_timeout: float = DEFAULT_BODY_TIMEOUT
