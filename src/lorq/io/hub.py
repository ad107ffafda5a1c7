"""A hub id as a local folder: its snapshot in the Hugging Face cache (downloaded first when the
hub answers), holding config.json, the tokenizer and the safetensors weights."""

from __future__ import annotations

import os
from pathlib import Path

from lorq.io.models import hub_reachable

HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


def hub_cache() -> str | None:
    """The hub cache the environment names now (huggingface_hub reads HF_HUB_CACHE and HF_HOME
    once, at import); None: huggingface_hub's default."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return os.path.expandvars(os.path.expanduser(os.environ[variable]))
    home = os.environ.get("HF_HOME")
    return os.path.join(os.path.expandvars(os.path.expanduser(home)), "hub") if home else None


def hub_folder(name: str) -> Path:
    """The local snapshot of hub id ``name``: the cache first, then a download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = hub_cache()
    try:
        return Path(
            snapshot_download(
                name, allow_patterns=HUB_PATTERNS, local_files_only=True, cache_dir=cache
            )
        )
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    if not hub_reachable():
        raise FileNotFoundError(
            f"model {name!r} is not in the Hugging Face cache and the hub is unreachable; pass a "
            "local folder"
        )
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS, cache_dir=cache))
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise FileNotFoundError(f"model {name!r} could not be downloaded ({err})") from None
