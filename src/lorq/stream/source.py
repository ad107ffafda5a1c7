"""The checkpoint a streaming run reads: a local folder, or a hub id from the Hugging Face cache
(downloaded first when the hub answers), holding config.json and safetensors weights."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorq.models import ModelSource, check_no_foreign_code, hub_reachable, resolve, source_config
from lorq.stream.checkpoint import Checkpoint

HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


@dataclass(frozen=True)
class StreamSource:
    """A checkpoint to stream: its name, local folder, HF config and tensors."""

    source: ModelSource
    folder: Path
    config: Any
    checkpoint: Checkpoint

    @property
    def inputs(self) -> tuple[str, ...]:
        return (str(self.folder),)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the checkpoint: its folder and the size of every weight file."""
        files = sorted({e.shard for e in self.checkpoint.entries.values()})
        return {
            "folder": str(self.folder.resolve()),
            "files": {f.name: f.stat().st_size for f in files},
        }


def hub_cache() -> str | None:
    """The hub cache the environment names now (huggingface_hub reads HF_HUB_CACHE and HF_HOME
    once, at import); None: huggingface_hub's default."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return os.path.expandvars(os.path.expanduser(os.environ[variable]))
    home = os.environ.get("HF_HOME")
    return os.path.join(os.path.expandvars(os.path.expanduser(home)), "hub") if home else None


def _hub_folder(name: str) -> Path:
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


def stream_source(name: str) -> StreamSource:
    """The checkpoint ``name`` (folder or hub id); ValueError for a GGUF or pickle-only model."""
    source = resolve(name)
    if source.gguf_file:
        raise ValueError(
            f"model {name!r} is a GGUF file; streaming reads safetensors checkpoints (GGUF models "
            "load whole: leave out stream / --stream)"
        )
    folder = Path(source.path) if Path(source.path).is_dir() else _hub_folder(name)
    source = ModelSource(source.name, str(folder))
    check_no_foreign_code(source)
    checkpoint = Checkpoint(folder)
    return StreamSource(source, folder, source_config(source), checkpoint)
