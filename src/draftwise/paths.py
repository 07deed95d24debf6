"""Where draftwise keeps files it makes: the cache folder (bundled models, built kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: Path | None = None) -> Path:
    """The draftwise cache folder: `cache_dir`, else `$DRAFTWISE_CACHE`, else ~/.cache/draftwise."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("DRAFTWISE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "draftwise"
