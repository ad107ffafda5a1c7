"""Checks of a lorq directory, before anything is allocated and after the tensors are read.

    lorq.json  ×  the header of model.safetensors (name, dtype, shape; sizes bounded by the file)
      types         every field of lorq.json has the JSON type it must have
      manifest      every tensor exactly as lorq.json's ``tensors`` records it; none unaccounted
      packed layer  Σ bytes of its buffers = format.nbytes(config, shape); factors (out×r, r×·)
    after reading   factors and scales finite; the dense parameters share one float dtype

Each failure is one ValueError naming the file and the tensor. A lorq.json that claims absurd
sizes fails on arithmetic, never on an allocation: every size compared is the header's, and
safetensors checks the header against the bytes on disk.
"""

from __future__ import annotations

import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from lorq.io.safetensors import ITEM_BYTES, TORCH_TO_SAFETENSORS, checksums, file_sha256
from lorq.io.safetensors import read_header as safetensors_header
from lorq.nn.quant_linear import buffer_name
from lorq.quant import QuantConfig, format_of

Header = dict[str, tuple[str, tuple[int, ...]]]  # name → (safetensors dtype, shape)
FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "layers": dict,
    "aliases": dict,
    "restore_dtypes": dict,
    "int8_factors": list,
    "trainable": list,
    "tensors": dict,
    "hf_config": (dict, type(None)),
    "model_class": str,
}
RESTORABLE = ("float32", "float16", "bfloat16")
log = logging.getLogger(__name__)


def check_types(meta: dict[str, Any], file: Path) -> None:
    """Every field of lorq.json that load reads has its JSON type."""
    for key, kind in FIELD_TYPES.items():
        if key in meta and not isinstance(meta[key], kind):
            raise ValueError(f"{file}: {key!r} has the wrong JSON type; re-run lorq compress")
    for name, spec in meta.get("layers", {}).items():
        if not isinstance(spec, dict) or not isinstance(spec.get("quant"), dict):
            raise ValueError(f"{file}: layer {name!r} is not a layer description")
    if any(v not in RESTORABLE for v in meta.get("restore_dtypes", {}).values()):
        raise ValueError(f"{file}: restore_dtypes names a dtype lorq does not write")


def read_header(file: Path) -> Header:
    """Names, dtypes and shapes of a safetensors file (``lorq.io.safetensors.read_header``:
    every field checked), read without loading a tensor; ValueError naming the file."""
    try:
        return {name: (e.dtype, e.shape) for name, e in safetensors_header(file).items()}
    except ValueError as err:
        raise ValueError(f"{err}; re-run lorq compress") from None


def tensor_bytes(entry: tuple[str, tuple[int, ...]]) -> int:
    dtype, shape = entry
    if dtype not in ITEM_BYTES:
        raise ValueError(f"dtype {dtype} is not one lorq writes")
    return ITEM_BYTES[dtype] * math.prod(shape)


def check_manifest(meta: dict[str, Any], header: Header, file: Path) -> None:
    """The file holds exactly the tensors lorq.json's manifest lists, with their dtypes and shapes
    (directories written before the manifest existed skip this)."""
    manifest = meta.get("tensors")
    if manifest is None:
        return
    extra, missing = sorted(set(header) - set(manifest)), sorted(set(manifest) - set(header))
    if extra or missing:
        which = f"tensors not in lorq.json: {extra[:3]}" if extra else f"missing: {missing[:3]}"
        raise ValueError(f"{file} does not match lorq.json ({which}); re-run lorq compress")
    for name, recorded in manifest.items():
        if [header[name][0], list(header[name][1])] != recorded:
            raise ValueError(
                f"{file}: tensor {name!r} is {header[name][0]} {list(header[name][1])}, "
                f"lorq.json says {recorded}; the directory was altered, re-run lorq compress"
            )


def manifest(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    """{name: [safetensors dtype, shape]} of the tensors :func:`lorq.io.save` writes."""
    return {name: [_dtype_name(t.dtype), list(t.shape)] for name, t in tensors.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return TORCH_TO_SAFETENSORS.get(dtype, str(dtype))


def _layer_shape(name: str, spec: dict[str, Any], file: Path) -> tuple[int, int]:
    shape = spec.get("shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 2
        and all(isinstance(n, int) and n > 0 for n in shape)
    ):
        raise ValueError(f"{file}: layer {name!r} has shape {shape!r}; expected [out, in] > 0")
    return shape[0], shape[1]


def check_layer(name: str, spec: dict[str, Any], header: Header, aliases: dict, file: Path):
    """A packed layer's buffers hold exactly its format's bytes; its factors fit its shape."""
    shape = _layer_shape(name, spec, file)
    config = QuantConfig.from_dict(spec["quant"])
    fmt = format_of(config)
    fmt.check_shape(config, shape)
    stored = 0
    for key in fmt.buffer_keys(config):
        full = f"{name}.{buffer_name(key)}"
        entry = header.get(aliases.get(full, full))
        if entry is None:
            raise ValueError(
                f"{file} has no tensor {full!r} (layer {name!r}); re-run lorq compress"
            )
        stored += tensor_bytes(entry)
    expected = fmt.nbytes(config, shape)
    if stored != expected:
        raise ValueError(
            f"{file}: layer {name!r} stores {stored} bytes, but {config.name} of shape "
            f"{list(shape)} takes {expected}; the directory was altered, re-run lorq compress"
        )
    if spec.get("kind") in ("lora", "qa-lora"):
        _check_factors(name, spec, shape, header, file)


def _check_factors(name, spec, shape: tuple[int, int], header: Header, file: Path) -> None:
    a, b = header.get(f"{name}.lora_A"), header.get(f"{name}.lora_B")
    rank = spec.get("rank")
    if a is None or b is None:
        raise ValueError(f"{file} lacks the factors of layer {name!r}; re-run lorq compress")
    if len(a[1]) != 2 or len(b[1]) != 2 or b[1] != (shape[0], rank) or a[1][0] != rank:
        raise ValueError(
            f"{file}: the factors of layer {name!r} are A {list(a[1])} and B {list(b[1])}, "
            f"which do not fit its shape {list(shape)} and rank {rank}"
        )


def layer_names(name: str, spec: dict[str, Any], aliases: dict[str, str]) -> set[str]:
    """The stored tensors a packed layer is built from (aliases resolved)."""
    config = QuantConfig.from_dict(spec["quant"])
    names = [f"{name}.{buffer_name(key)}" for key in format_of(config).buffer_keys(config)]
    names += [f"{name}.lora_A", f"{name}.lora_B"] if spec.get("kind") in ("lora", "qa-lora") else []
    names += [f"{name}.bias"] if spec.get("bias") else []
    return {aliases.get(n, n) for n in names}


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
BLOCK_INDEX = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")


def check_layer_count(config: dict[str, Any] | None, header: Header, file: Path) -> None:
    """The config's number of blocks is the number the file holds (a lorq.json claiming a million
    blocks would otherwise build a million modules before failing)."""
    indices = [int(m.group(1)) for name in header for m in [BLOCK_INDEX.search(name)] if m]
    for key in LAYER_COUNT_KEYS:
        claimed = (config or {}).get(key)
        if isinstance(claimed, int) and indices and claimed != max(indices) + 1:
            raise ValueError(
                f"{file} holds {max(indices) + 1} blocks, lorq.json's config says {key}="
                f"{claimed}; the directory was altered, re-run lorq compress"
            )


def check_header(meta: dict[str, Any], header: Header, file: Path) -> None:
    """Everything about ``file`` that lorq.json decides, before a tensor is read."""
    check_manifest(meta, header, file)
    check_layer_count(meta.get("hf_config"), header, file)
    aliases = meta.get("aliases", {})
    for name, spec in meta["layers"].items():
        try:
            check_layer(name, spec, header, aliases, file)
        except (KeyError, TypeError) as err:
            raise ValueError(f"{file}: layer {name!r} is malformed in lorq.json ({err})") from None


def check_finite(tensors: dict[str, torch.Tensor], layers: dict[str, Any], file: Path) -> None:
    """Factors and the float buffers of packed layers (scales, zeros) hold finite values."""
    prefixes = tuple(f"{name}." for name in layers)
    for name, tensor in tensors.items():
        packed = name.startswith(prefixes)
        if packed and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{file}: tensor {name!r} holds NaN or infinite values")


def check_dense_dtypes(model: torch.nn.Module, layers: dict[str, Any], file: Path) -> None:
    """The dense parameters (not packed layers, not factors) share one float dtype."""
    prefixes = tuple(f"{name}." for name in layers)
    dtypes: dict[torch.dtype, str] = {}
    for name, param in model.named_parameters():
        if param.is_floating_point() and not name.startswith(prefixes):
            dtypes.setdefault(param.dtype, name)
    if len(dtypes) > 1:
        found = ", ".join(f"{name} {dtype}" for dtype, name in dtypes.items())
        raise ValueError(f"{file}: the dense tensors mix dtypes ({found}); re-run lorq compress")


def file_checksums(files: dict[str, Path]) -> dict[str, Any]:
    """lorq.json's ``checksums`` of the weight files ``files`` ({name in the directory: path}):
    each file's size and sha256 and each tensor's sha256 (``lorq.io.safetensors.checksums``)."""
    record: dict[str, Any] = {"algorithm": "sha256", "files": {}, "tensors": {}}
    for name, path in files.items():
        whole, tensors = checksums(path)
        record["files"][name] = {"size": path.stat().st_size, "sha256": whole}
        record["tensors"].update(tensors)
    return record


def check_checksums(meta: dict[str, Any], folder: Path, files: list[Path]) -> None:
    """Every weight file of ``folder`` has the size and sha256 lorq.json records; ValueError
    naming the file and, when one is, the damaged tensor. A directory written before lorq
    recorded checksums loads with a one-line notice."""
    record = meta.get("checksums")
    if record is None:
        log.warning("%s has no checksums (written by lorq before 0.3): not verified", folder)
        return
    recorded = record.get("files") if isinstance(record, dict) else None
    if not isinstance(recorded, dict) or sorted(recorded) != sorted(f.name for f in files):
        raise ValueError(f"{folder}: lorq.json's checksums do not list its weight files")
    for file in files:
        expected = recorded[file.name]
        if not isinstance(expected, dict) or file.stat().st_size != expected.get("size"):
            raise ValueError(f"{file} has the wrong size for lorq.json; {AGAIN}")
    workers = min(len(files), os.cpu_count() or 1) or 1
    with ThreadPoolExecutor(workers) as pool:  # hashlib lets go of the GIL while it hashes
        digests = list(pool.map(file_sha256, files))
    for file, digest in zip(files, digests, strict=True):
        if digest != recorded[file.name].get("sha256"):
            raise ValueError(_damage(file, checksums(file)[1], record.get("tensors") or {}))


AGAIN = "the directory is damaged: copy it again or re-run lorq compress"


def _damage(file: Path, tensors: dict[str, str], recorded: dict[str, str]) -> str:
    """What differs in a file whose sha256 does not match: its first damaged tensor, or else
    its header or lorq.json's record."""
    for name, digest in tensors.items():
        if recorded.get(name) != digest:
            return f"{file}: tensor {name!r} is damaged (its sha256 differs); {AGAIN}"
    return f"{file}: its sha256 differs from lorq.json's; {AGAIN}"
