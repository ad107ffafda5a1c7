"""safetensors files: the one header reader every path uses, checksums, and a checkpoint read
tensor by tensor, never whole.

    file  = u64 n (little endian) ‖ n bytes of JSON header ‖ the tensors' bytes
    header = {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {…}}

``read_header`` checks all of it before anything uses it: the length, the JSON, every entry's
dtype, shape and offsets (its bytes = its shape × its dtype's size; the entries tile the data
with no gap or overlap), and that the data ends where the file ends. Every fault is one
ValueError naming the file and the entry. ``checksums`` hashes a file (sha256) and each tensor's
bytes in one pass (lorq.json records both; the loaders verify them).

    DIR/model.safetensors                         one file, or
    DIR/model.safetensors.index.json              {"weight_map": {tensor name: shard file}}
    DIR/model-0000k-of-0000n.safetensors          the shards it names

``Checkpoint.tensor(name)`` maps the one tensor it reads (``safe_open``); nothing else of the
checkpoint is resident.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TORCH_TO_SAFETENSORS = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
    torch.int32: "I32", torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float32: "F32", torch.float64: "F64", torch.uint16: "U16", torch.uint32: "U32",
    torch.uint64: "U64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
ITEM_BYTES = {name: dtype.itemsize for dtype, name in TORCH_TO_SAFETENSORS.items()}


MAX_HEADER = 100 << 20  # bytes: safetensors' own limit on the JSON header


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives: its file, safetensors dtype, shape and byte range (from the file's
    start)."""

    shard: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count * ITEM_BYTES[self.dtype]


def _damaged(file: Path, what: str) -> ValueError:
    return ValueError(f"{file} is not a whole safetensors file ({what}); copy or write it again")


def _header_json(file: Path, size: int) -> tuple[dict, int]:
    """(the parsed header, where the data starts)."""
    if size < 8:
        raise _damaged(file, f"{size} bytes, shorter than the 8-byte header length")
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > MAX_HEADER or 8 + length > size:
            raise _damaged(file, f"a header of {length} bytes in a file of {size}")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise _damaged(file, f"its header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise _damaged(file, "its header is not a JSON object")
    return header, 8 + length


def _entry(file: Path, name: str, info: object, start: int) -> Entry:
    """One header entry, checked: a known dtype, a shape of integers ≥ 0, offsets that span
    exactly its bytes."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _damaged(file, f"entry {name!r} is not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in ITEM_BYTES:
        raise _damaged(file, f"entry {name!r} has dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise _damaged(file, f"entry {name!r} has shape {shape!r}")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
    ):
        raise _damaged(file, f"entry {name!r} has data_offsets {offsets!r}")
    entry = Entry(file, dtype, tuple(shape), start + offsets[0], start + offsets[1])
    if not 0 <= offsets[0] <= offsets[1] or offsets[1] - offsets[0] != entry.nbytes:
        raise _damaged(
            file, f"entry {name!r} spans bytes {offsets}, its shape needs {entry.nbytes}"
        )
    return entry


def read_header(file: str | Path) -> dict[str, Entry]:
    """Every tensor entry of the safetensors ``file``, in file order, checked (module
    docstring); FileNotFoundError when it is missing."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    size = file.stat().st_size
    header, start = _header_json(file, size)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise _damaged(file, "its __metadata__ is not a JSON object")
    entries = {name: _entry(file, name, info, start) for name, info in header.items()}
    ordered = dict(sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)))
    end = start
    for name, entry in ordered.items():
        if entry.begin != end:
            what = "overlaps the one before" if entry.begin < end else "leaves a gap before it"
            raise _damaged(file, f"entry {name!r} {what}")
        end = entry.end
    if end != size:
        state = "truncated" if end > size else f"{size - end} bytes past its last tensor"
        raise _damaged(file, f"{state}: {size} bytes, its header describes {end}")
    return ordered


def checksums(file: str | Path) -> tuple[str, dict[str, str]]:
    """(sha256 of the whole file, {tensor: sha256 of its bytes}), in one read of the file."""
    file = Path(file)
    entries = read_header(file)
    whole = hashlib.sha256()
    tensors = {}
    with open(file, "rb") as f:
        start = min((e.begin for e in entries.values()), default=f.seek(0, 2))
        f.seek(0)
        whole.update(f.read(start))
        for name, entry in entries.items():
            own = hashlib.sha256()
            for chunk in _chunks(f, entry.end - entry.begin):
                own.update(chunk)
                whole.update(chunk)
            tensors[name] = own.hexdigest()
    return whole.hexdigest(), tensors


def file_sha256(file: str | Path) -> str:
    """The sha256 of the whole file: what a load verifies (the tensors' own digests are read
    only to name the damaged one, :func:`checksums`)."""
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _chunks(f, nbytes: int, size: int = 1 << 24):
    while nbytes > 0:
        chunk = f.read(min(size, nbytes))
        if not chunk:
            return
        nbytes -= len(chunk)
        yield chunk


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
    return {name: single for name in read_header(single)}


def _shard_header(shard: Path) -> dict[str, Entry]:
    """A shard's entries; a missing shard is named with the index that names it."""
    if not shard.is_file():
        raise FileNotFoundError(
            f"shard {shard.name} (named by {INDEX_FILE}) is missing from {shard.parent}; "
            "download or copy it again"
        )
    return read_header(shard)


class Checkpoint:
    """The tensors of a safetensors checkpoint folder, by name, read one at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        weight_map = _weight_map(self.folder)
        self.entries: dict[str, Entry] = {}
        for shard in dict.fromkeys(weight_map.values()):
            for name, entry in _shard_header(shard).items():
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
        return sum(entry.nbytes // ITEM_BYTES[entry.dtype] for entry in self.entries.values())

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
