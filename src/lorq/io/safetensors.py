"""A Hugging Face safetensors checkpoint read tensor by tensor, never whole.

    DIR/model.safetensors                         one file, or
    DIR/model.safetensors.index.json              {"weight_map": {tensor name: shard file}}
    DIR/model-0000k-of-0000n.safetensors          the shards it names

``Checkpoint.tensor(name)`` maps the one tensor it reads (``safe_open``); nothing else of the
checkpoint is resident. Every fault is a ValueError / FileNotFoundError naming the shard and the
tensor: an index naming a missing file, a truncated shard, a tensor the checkpoint lacks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ITEM_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives: its shard, safetensors dtype and shape."""

    shard: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count * ITEM_BYTES.get(self.dtype, 4)


def _weight_map(folder: Path) -> dict[str, Path]:
    """{tensor name: shard path} from the index, or every tensor of the single file."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a safetensors index ({err}); repair it") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: weight_map must map tensor names to shard files")
        return {name: folder / str(file) for name, file in weight_map.items()}
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(
            f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}; streaming reads safetensors "
            "checkpoints (convert the weights with save_pretrained(safe_serialization=True))"
        )
    return {name: single for name in _header(single)}


def _header(shard: Path) -> dict[str, Entry]:
    """The shard's tensor entries; names the shard when it is missing or not safetensors."""
    if not shard.is_file():
        raise FileNotFoundError(
            f"shard {shard.name} (named by {INDEX_FILE}) is missing from {shard.parent}; "
            "download or copy it again"
        )
    truncated = ValueError(f"shard {shard} is truncated; download or copy it again")
    try:
        with open(shard, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if os.path.getsize(shard) < 8 + size:
                raise truncated
            header = json.loads(f.read(size))
    except (ValueError, OSError) as err:
        if err is truncated:
            raise
        raise ValueError(f"shard {shard} is not a safetensors file ({err})") from None
    header.pop("__metadata__", None)
    entries = {}
    end = 8 + size
    for name, info in header.items():
        entries[name] = Entry(shard, info["dtype"], tuple(info["shape"]))
        end = max(end, 8 + size + info["data_offsets"][1])
    if os.path.getsize(shard) < end:
        raise ValueError(
            f"shard {shard} is truncated ({os.path.getsize(shard)} bytes, its header needs "
            f"{end}); download or copy it again"
        )
    return entries


class Checkpoint:
    """The tensors of a safetensors checkpoint folder, by name, read one at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        weight_map = _weight_map(self.folder)
        self.entries: dict[str, Entry] = {}
        for shard in dict.fromkeys(weight_map.values()):
            for name, entry in _header(shard).items():
                if weight_map.get(name) == shard:
                    self.entries[name] = entry
        missing = sorted(set(weight_map) - set(self.entries))
        if missing:
            shard = weight_map[missing[0]].name
            raise ValueError(f"shard {shard} lacks tensor {missing[0]!r} that {INDEX_FILE} names")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries.values())

    @property
    def numel(self) -> int:
        return sum(
            entry.nbytes // ITEM_BYTES.get(entry.dtype, 4) for entry in self.entries.values()
        )

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``name`` (a copy in ``dtype`` when given), read from its shard alone."""
        entry = self.entries.get(name)
        if entry is None:
            raise ValueError(f"checkpoint {self.folder} has no tensor {name!r}")
        try:
            with safe_open(entry.shard, framework="pt") as f:
                tensor = f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ValueError(
                f"shard {entry.shard.name}: tensor {name!r} is unreadable ({err}); download or "
                "copy the shard again"
            ) from None
        return tensor.to(dtype) if dtype is not None else tensor
