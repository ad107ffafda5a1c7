"""lorq's native model directory.

    DIR/model.safetensors   every tensor of the model: packed codes, scales, zeros, LoRA factors and
                            all other parameters and buffers (tied tensors stored once)
    DIR/config.json         the model's HF config with ``quantization_config`` (quant_method "lorq",
                            format and lorq version, the layers): ``from_pretrained`` reads the
                            directory once ``import lorq`` registered lorq.io.hf_quantizer
    DIR/tokenizer files     when a tokenizer is given
    DIR/lorq.json           format version, lorq version, source model, the HF config, the compress
                            config, every packed layer's kind ("lora" QuantLoraLinear, "qa-lora"
                            QALoraLinear, "quant" QuantLinear, "embedding" QuantEmbedding) /
                            quant config / shape / rank / scaling, tensor aliases, the budget plan

lorq.json is written last: a directory that has it is finished (``is_lorq_dir``). ``load`` builds
the architecture on the meta device and assigns the stored tensors (no access to the original
weights); the round trip is bit-exact. Directories written before config.json existed still load.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorq._version import __version__
from lorq.io.verify import (
    check_checksums,
    check_dense_dtypes,
    check_finite,
    check_header,
    check_types,
    file_checksums,
    layer_names,
    manifest,
    read_header,
)
from lorq.model.skeleton import skeleton
from lorq.model.targets import set_module
from lorq.nn import QALoraLinear, QuantEmbedding, QuantLinear, QuantLoraLinear
from lorq.quant import QuantConfig
from lorq.quant.factors import Int8Rows, exact_rows
from lorq.util.atomic import atomic_directory

FORMAT = "lorq"
FORMAT_VERSION = 1
LORQ_FILE = "lorq.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# the lorq.json fields that config.json's quantization_config repeats for from_pretrained
QUANTIZATION_FIELDS = ("model_class", "layers", "aliases", "int8_factors", "trainable", "checksums")
META_ATTR = "lorq_meta"  # the model attribute that carries its lorq.json provenance
# what a saved model's lorq.json carries over to a model made from it (finetune, merge)
CARRIED_META = ("source", "compress", "plan", "calibration", "evaluation", "pipeline", "recovery",
                "finetune", "merge")  # fmt: skip


def model_meta(model: nn.Module) -> dict[str, Any]:
    """The provenance a model carries (source, compress config, plan, evaluation, …)."""
    return dict(getattr(model, META_ATTR, None) or {})


def set_model_meta(model: nn.Module, meta: dict[str, Any]) -> None:
    """Attach ``meta`` to ``model`` (a plain attribute; saved by :func:`save` into lorq.json)."""
    model.__dict__[META_ATTR] = {k: v for k, v in meta.items() if k in CARRIED_META}


LOADED_FROM_ATTR = "lorq_loaded_from"  # the directory :func:`load` read a model from


def input_paths(model: nn.Module) -> tuple[str, ...]:
    """The directory ``model`` was loaded from (an output must never replace it), if any."""
    loaded_from = model.__dict__.get(LOADED_FROM_ATTR)
    return (loaded_from,) if loaded_from else ()


def is_lorq_dir(path: Path) -> bool:
    try:
        return json.loads((path / LORQ_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) by qualified name, shared ones repeated."""
    out: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for kind in (module._parameters, module._buffers):
            for leaf, tensor in kind.items():
                if tensor is not None:
                    out[prefix + leaf] = tensor
    return out


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in tensors.items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.device)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.detach().contiguous().cpu()
    return unique, aliases


PACKED = (QuantLinear, QuantEmbedding)
NARROW = (torch.bfloat16, torch.float16)  # tried in this order for dense float tensors


def int8_factors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """LoRA factors already on their 8-bit grid (``lorq.quant.factors``) stored as int8 codes
    plus ``NAME.scales``, in place; returns their names (others stay float: nothing is lost)."""
    names = []
    for name in [n for n in tensors if n.endswith((".lora_A", ".lora_B"))]:
        rows = exact_rows(tensors[name])
        if rows is not None:
            tensors[name], tensors[f"{name}.scales"] = rows.codes, rows.scales
            names.append(name)
    return names


def _decode_factors(tensors: dict[str, torch.Tensor], names: list[str]) -> None:
    for name in names:
        tensors[name] = Int8Rows(tensors[name], tensors.pop(f"{name}.scales")).dequantize()


def narrowed(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Narrow dense float32 tensors (2-D and more, not packed buffers nor LoRA factors) to the
    first 16-bit dtype that holds every value exactly — the source's own precision when it was a
    16-bit checkpoint — in place; returns {name: dtype to restore on load}."""
    restore = {}
    for name, tensor in tensors.items():
        leaf = name.rpartition(".")[2]
        if tensor.dtype != torch.float32 or tensor.dim() < 2 or leaf.startswith(("q_", "lora_")):
            continue
        for dtype in NARROW:
            small = tensor.to(dtype)
            if torch.equal(small.float(), tensor):
                tensors[name], restore[name] = small, "float32"
                break
    return restore


def _layer_spec(layer: QuantLinear | QuantEmbedding) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "kind": layer.kind,
        "quant": layer.quant_config.to_dict(),
        "shape": list(layer.shape),
        "bias": getattr(layer, "bias", None) is not None,
    }
    if isinstance(layer, (QuantLoraLinear, QALoraLinear)):
        spec.update(rank=layer.rank, scaling=layer.scaling)
    if isinstance(layer, QuantEmbedding) and layer.scale != 1.0:
        spec["scale"] = layer.scale
    return spec


def hf_config(model: nn.Module) -> dict[str, Any] | None:
    """The model's HF config, minus what describes the source file rather than the model."""
    if not hasattr(model, "config"):
        return None
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        config.pop(key, None)
    return config


def payload(
    model: nn.Module, extra: dict[str, Any] | None = None, factor_codes: bool = True
) -> tuple[dict, dict]:
    """(tensors, lorq.json) of ``model`` as :func:`save` writes them: tied tensors once, dense
    ones narrowed where exact, factors on their 8-bit grid as int8 codes (unless not
    ``factor_codes``: then every factor is stored as it is, readable as a plain state dict)."""
    layers = {n: _layer_spec(m) for n, m in model.named_modules() if isinstance(m, PACKED)}
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("the model has no quantized layers; compress it before saving")
    tensors, aliases = _dedupe(named_tensors(model))
    restore = narrowed(tensors)
    factors = int8_factors(tensors) if factor_codes else []
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lorq_version": __version__,
        "model_class": type(model).__name__,
        "hf_config": hf_config(model),
        "layers": layers,
        "aliases": aliases,
        "restore_dtypes": restore,
        "int8_factors": factors,
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "tensors": manifest(tensors),
        **model_meta(model),
        **(extra or {}),
    }
    return tensors, meta


def quantization_config(meta: dict[str, Any]) -> dict[str, Any]:
    """config.json's ``quantization_config`` for a directory whose lorq.json is ``meta``."""
    versions = {key: meta[key] for key in ("format_version", "lorq_version")}
    fields = {key: meta[key] for key in QUANTIZATION_FIELDS if key in meta}
    return {"quant_method": FORMAT, **versions, **fields}


def write_config(model: nn.Module, file: Path, meta: dict[str, Any]) -> bool:
    """Write the model's HF config with lorq's ``quantization_config`` to ``file``; False (and
    nothing written) for a model without an HF config."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_file"):
        return False
    config = copy.deepcopy(config)
    config.quantization_config = quantization_config(meta)
    config.architectures = [meta["model_class"]]
    config.to_json_file(file)
    return True


def write_meta(file: Path, meta: dict[str, Any]) -> None:
    """Write lorq.json (the last file of a directory: it marks it finished)."""
    file.write_text(json.dumps(meta, indent=1, default=str))


def save(
    model: Any,
    path: str | Path,
    tokenizer: Any = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model with QuantLoraLinear, QALoraLinear or QuantLinear layers to ``path``
    atomically; returns the path.

    ``model``: the model, or a result that holds one (``lorq.compress_model``'s, ``lorq.merge``'s:
    its ``model`` and ``tokenizer`` are used). ``lorq.json`` records the model's own provenance
    (:func:`model_meta`) updated with ``extra``.
    """
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "model", None), nn.Module):
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        model = model.model
    tensors, meta = payload(model, extra)
    inputs = input_paths(model)
    with atomic_directory(path, overwrite, is_lorq_dir, "lorq model", inputs) as tmp:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        meta["checksums"] = file_checksums({WEIGHTS_FILE: tmp / WEIGHTS_FILE})
        write_config(model, tmp / CONFIG_FILE, meta)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_meta(tmp / LORQ_FILE, meta)  # last: the directory is finished
    return Path(path)


def read_meta(path: str | Path) -> dict[str, Any]:
    """lorq.json of a saved model; ValueError / FileNotFoundError naming the file when unusable."""
    file = Path(path) / LORQ_FILE
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: {path} is not a lorq model directory")
    try:
        meta = json.loads(file.read_text())
    except ValueError as err:
        raise ValueError(f"{file} is corrupted ({err}); re-run lorq compress") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "layers" not in meta:
        raise ValueError(f"{file} is not a lorq model description; re-run lorq compress")
    check_format_version(meta.get("format_version"), meta.get("lorq_version"), file)
    check_types(meta, file)
    return meta


def check_format_version(version: Any, written_by: Any, file: Path | str) -> None:
    """ValueError unless this lorq reads ``version`` (a newer one: upgrade lorq)."""
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise ValueError(
            f"{file}: format_version {version} (written by lorq {written_by}) is newer than "
            f"lorq {__version__} reads (format_version {FORMAT_VERSION}); upgrade lorq "
            "(pip install -U lorq)"
        )
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ValueError(f"{file}: format_version {version!r} is not supported")


INDEX_FILE = "model.safetensors.index.json"  # a sharded directory (``lorq.compress_streaming``)


def weight_files(path: Path) -> list[Path]:
    """The weight files of a lorq directory: model.safetensors, or the shards its index names."""
    index = path / INDEX_FILE
    if (path / WEIGHTS_FILE).exists() or not index.exists():
        return [path / WEIGHTS_FILE]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in dict.fromkeys(weight_map.values())]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{index} is corrupted ({err}); re-run lorq compress") from None


def _read_tensors(path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` (one file or shards), read only after their checksums and
    headers matched lorq.json (io.verify)."""
    files = weight_files(path)
    for file in files:
        if not file.exists():
            raise FileNotFoundError(f"{file} not found; the lorq model directory is incomplete")
    check_checksums(meta, path, files)
    header = {}
    for file in files:
        header.update(read_header(file))
    check_header(meta, header, files[0] if len(files) == 1 else path / INDEX_FILE)
    tensors = {}
    for file in files:
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ValueError(
                f"{file} is corrupted or truncated ({err}); re-run lorq compress"
            ) from None
    return tensors


def _skeleton(meta: dict[str, Any]) -> nn.Module:
    import transformers

    config_dict = dict(meta["hf_config"] or {})
    model_type = config_dict.pop("model_type", None)
    if model_type is None:
        raise ValueError("lorq.json has no Hugging Face config; cannot rebuild the architecture")
    config = transformers.AutoConfig.for_model(model_type, **config_dict)
    cls = getattr(transformers, meta["model_class"], None)
    if cls is None:
        raise ValueError(f"transformers has no model class {meta['model_class']!r}; upgrade it")
    return skeleton(config, model_class=cls, real_buffers=False)


def build_layer(name: str, spec: dict[str, Any], named: dict[str, torch.Tensor]) -> nn.Module:
    """The packed layer ``name`` from ``named`` (every tensor by name, aliases included)."""
    prefix = f"{name}."
    own = {k[len(prefix) :]: v for k, v in named.items() if k.startswith(prefix)}
    config = QuantConfig.from_dict(spec["quant"])
    shape = (spec["shape"][0], spec["shape"][1])
    bias = own["bias"] if spec["bias"] else None
    kind = spec["kind"]
    if kind == "embedding":
        return QuantEmbedding.from_buffers(config, shape, own, spec.get("scale", 1.0))
    if kind == "quant":
        return QuantLinear.from_buffers(config, shape, own, bias)
    classes: dict[str, type[QuantLoraLinear] | type[QALoraLinear]] = {
        "lora": QuantLoraLinear,
        "qa-lora": QALoraLinear,
    }
    if kind not in classes:
        raise ValueError(
            f"layer {name!r} has kind {kind!r}; known: 'lora', 'qa-lora', 'quant', 'embedding'"
        )
    return classes[kind].from_buffers(
        config, shape, own, own["lora_B"], own["lora_A"], spec["scaling"], bias
    )


def place(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` at ``name`` as it is (the same object where it is placed twice: a tie)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = tensor  # type: ignore[assignment]
    else:
        module._buffers[leaf] = tensor


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, trainable: bool) -> torch.Tensor:
    """Put ``tensor`` at ``name`` (a Parameter where the skeleton has one); returns what was put."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    value = nn.Parameter(tensor, requires_grad=trainable) if leaf in module._parameters else tensor
    place(model, name, value)
    return value


def _assign_dense(
    model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any], file: Path
) -> set[str]:
    """Give every tensor still on the meta device its stored value (same shape, required);
    returns the stored names used."""
    aliases, trainable = meta.get("aliases", {}), set(meta.get("trainable", []))
    assigned: dict[str, torch.Tensor] = {}
    for name, tensor in named_tensors(model).items():
        if not tensor.is_meta:
            continue
        source = aliases.get(name, name)
        if source not in tensors:
            raise ValueError(f"{file} has no tensor {source!r}; the file is incomplete")
        if tensors[source].shape != tensor.shape:
            raise ValueError(
                f"{file}: tensor {source!r} has shape {list(tensors[source].shape)}, the model "
                f"needs {list(tensor.shape)}; the directory was altered, re-run lorq compress"
            )
        if source not in assigned:
            assigned[source] = _assign(model, name, tensors[source], source in trainable)
        else:
            place(model, name, assigned[source])
    for name, param in model.named_parameters(remove_duplicate=False):
        param.requires_grad_(name in trainable)
    return set(assigned)


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save`; raises ValueError naming a corrupted file."""
    path = Path(path)
    meta = read_meta(path)
    tensors = _read_tensors(path, meta)
    for name, dtype in meta.get("restore_dtypes", {}).items():
        if name in tensors:
            tensors[name] = tensors[name].to(getattr(torch, dtype))
    try:
        _decode_factors(tensors, meta.get("int8_factors", []))
    except KeyError as err:
        raise ValueError(f"{path / WEIGHTS_FILE} lacks the 8-bit factor scales {err}") from None
    check_finite(tensors, meta["layers"], path / WEIGHTS_FILE)
    model = _skeleton(meta)
    aliases = meta.get("aliases", {})
    named = {**{a: tensors[s] for a, s in aliases.items() if s in tensors}, **tensors}
    try:
        for name, spec in meta["layers"].items():
            set_module(model, name, build_layer(name, spec, named))
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path / WEIGHTS_FILE} does not match {LORQ_FILE} ({err})") from None
    used = _assign_dense(model, tensors, meta, path / WEIGHTS_FILE)
    for name, spec in meta["layers"].items():
        used |= layer_names(name, spec, aliases)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(
            f"{path / WEIGHTS_FILE} holds tensors the model does not have ({unused[:3]}); "
            "the directory was altered, re-run lorq compress"
        )
    check_dense_dtypes(model, meta["layers"], path / WEIGHTS_FILE)
    set_model_meta(model, meta)
    model.__dict__[LOADED_FROM_ATTR] = str(path.resolve())
    return model.to(device).eval()


def load_with_tokenizer(path: str | Path) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a lorq model directory; ValueError when it has no tokenizer files."""
    from transformers import AutoTokenizer

    model = load(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        raise ValueError(f"{path} has no tokenizer files; re-run lorq compress") from None
    return model, tokenizer
