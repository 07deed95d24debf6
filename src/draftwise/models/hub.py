"""Models by Hugging Face Hub id (`Qwen/Qwen2.5-Coder-1.5B-Instruct`), through `huggingface_hub`.

Only what the native decoder reads is fetched (config, safetensors weights, tokenizer and
chat template files), into the standard Hugging Face cache (`HF_HOME` / `HF_HUB_CACHE`),
with huggingface_hub's progress bars; a model already there loads without the network,
and `HF_HUB_OFFLINE=1` keeps it that way. `revision` pins a branch, tag or commit.
"""

from __future__ import annotations

import re
from pathlib import Path

from draftwise.errors import ModelNotFound

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
         "special_tokens_map.json", "vocab.json", "merges.txt", "*.model", "chat_template.*"]


def looks_like_hub_id(ref: str) -> bool:
    """`org/name` that is not an existing path."""
    return bool(HUB_ID.match(ref)) and not Path(ref).expanduser().exists()


def fetch(repo_id: str, revision: str | None = None, progress: bool = True) -> Path:
    """The local folder of the model `repo_id` (downloaded now if not cached)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    if not progress:
        disable_progress_bars()
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=FILES))
    except LocalEntryNotFoundError:
        raise ModelNotFound(f"{where}: not in the Hugging Face cache, and the Hub cannot be reached (offline, or "
                            "HF_HUB_OFFLINE is set); download it once with a network, or give a local folder") from None
    except GatedRepoError:
        raise ModelNotFound(f"{where}: a gated model; accept its terms on the Hub and log in "
                            "(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"{where}: no such model on the Hugging Face Hub (nor a local file or folder)") from None
    except RevisionNotFoundError:
        raise ModelNotFound(f"{where}: the model has no such revision") from None
    except HfHubHTTPError as e:
        raise ModelNotFound(f"{where}: the Hugging Face Hub answered {e}") from None
    finally:
        if not progress:
            enable_progress_bars()
