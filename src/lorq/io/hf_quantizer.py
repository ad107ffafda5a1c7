"""``from_pretrained`` for lorq directories: quant_method "lorq" registered with transformers.

``import lorq`` registers :class:`LorqConfig` and :class:`LorqHfQuantizer`. A directory written by
``lorq.save`` carries ``config.json`` with ``quantization_config`` (quant_method "lorq", its
format and lorq versions, the model class, the packed layers, the tensor aliases, the factors
stored in 8 bits, the trainable parameters), so ``AutoModelForCausalLM.from_pretrained(dir)``
(``AutoModel`` for encoders) builds the same model as ``lorq.load(dir)``:

    config.json          LorqConfig: the fields' JSON types; a format_version newer than this lorq
                         reads → ValueError naming both versions: upgrade lorq
    before the weights   the weights' headers (model.safetensors, or the shards that
                         model.safetensors.index.json names, as compress_streaming writes them)
                         checked against the layers (lorq.io.verify);
                         every packed layer swapped in on the meta device with its tensors shaped
                         and typed as stored; every tensor of the model stored or an alias
    transformers         loads each stored tensor by name (dense ones cast to the model's dtype,
                         which undoes lorq's exact 16-bit narrowing)
    after the weights    what the native layout stores unlike a state dict: the 8-bit factors
                         decoded, aliases (tied tensors, stored once) placed, the non-persistent
                         buffers lorq stores, requires_grad on the trainable list (the factors)
    save_pretrained      lorq's writer, in place: model.safetensors, config.json, lorq.json last;
                         factors stored as they are, so Trainer's resume_from_checkpoint (a plain
                         load_state_dict) reads them

``dtype=`` applies to the dense tensors as for any model; packed buffers and factors keep their
stored dtypes (the default, float32, gives lorq.load's model bit for bit).

Training: the LoRA factors are the adapters, so the quantizer reports ``is_qat_trainable`` when
the model has trainable factors and transformers' Trainer (or TRL's SFTTrainer) trains them, and
nothing else, with no PEFT wrapper. A merged model (no factors) is "purely quantized": Trainer
refuses it. TRL's SFTTrainer computes log-probabilities from ``lm_head.weight``, so it needs a
dense output layer: a model compressed with ``embeddings=`` (packed head) trains with Trainer.

Without ``import lorq`` transformers does not know "lorq": it logs "Unknown quantization type,
got lorq ... we will skip the quantization" and builds the plain architecture, whose compressed
linear layers are not in the file and are randomly initialised (its load report lists them as
MISSING and lorq's packed tensors as UNEXPECTED). That model is wrong: import lorq first.
"""

from __future__ import annotations

import contextlib
import re
import types
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from lorq._version import __version__
from lorq.io.native import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    LORQ_FILE,
    QUANTIZATION_FIELDS,
    WEIGHTS_FILE,
    build_layer,
    check_format_version,
    named_tensors,
    payload,
    place,
    read_meta,
    set_model_meta,
    write_config,
    write_meta,
)
from lorq.io.verify import (
    TORCH_TO_SAFETENSORS,
    Header,
    check_checksums,
    check_finite,
    check_header,
    check_types,
    file_checksums,
    read_header,
)
from lorq.model.targets import set_module
from lorq.quant.factors import Int8Rows
from lorq.util.atomic import atomic_file, output_lock

STORED_DTYPES = {name: dtype for dtype, name in TORCH_TO_SAFETENSORS.items()}
FACTOR_SCALES = r"\.lora_[AB]\.scales$"  # the scales of 8-bit factors: no tensor of the model
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # compress_streaming's shards


def factor_scales(spec: dict[str, Any]) -> set[str]:
    """The stored scales of the 8-bit factors (tensors of the file, not of the model)."""
    return {f"{name}.scales" for name in spec["int8_factors"]}


class LorqConfig(QuantizationConfigMixin):
    """config.json's ``quantization_config`` of a lorq directory (``lorq.io.native.save``)."""

    def __init__(
        self,
        format_version: int = FORMAT_VERSION,
        lorq_version: str = __version__,
        model_class: str = "",
        layers: dict[str, Any] | None = None,
        aliases: dict[str, str] | None = None,
        int8_factors: list[str] | None = None,
        trainable: list[str] | None = None,
        checksums: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        check_format_version(format_version, lorq_version, "quantization_config")
        self.quant_method = FORMAT  # type: ignore[assignment]
        self.format_version = format_version
        self.lorq_version = lorq_version
        self.model_class = model_class
        self.layers = layers or {}
        self.aliases = aliases or {}
        self.int8_factors = int8_factors or []
        self.trainable = trainable or []
        self.checksums = checksums
        check_types(self.spec(), Path("quantization_config"))

    def spec(self) -> dict[str, Any]:
        """The lorq.json fields this config repeats (what lorq.io.verify checks); a directory
        written before checksums has none."""
        spec = {key: getattr(self, key) for key in QUANTIZATION_FIELDS}
        return (
            spec
            if spec["checksums"] is not None
            else {k: v for k, v in spec.items() if k != "checksums"}
        )


class LorqHfQuantizer(HfQuantizer):
    """Loads a lorq directory in ``from_pretrained``; see the module docstring."""

    requires_calibration = True  # lorq.compress_model makes the layers; this only loads them
    quantization_config: LorqConfig

    def __init__(self, quantization_config: LorqConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.files: list[Path] = []
        self.where: dict[str, Path] = {}  # tensor name → the file that stores it
        self.header: Header = {}

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("a lorq model cannot be offloaded to disk; pass another device_map")

    def _process_model_before_weight_loading(
        self, model: nn.Module, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> nn.Module:
        self.files = weights_files(checkpoint_files)
        spec = self.quantization_config.spec()
        check_model_class(model, spec)
        self.header, self.where = read_stored_header(self.files, spec)
        build_skeleton(model, spec, self.header)
        check_stored(model, spec, self.header, described(self.files))
        expect_native_keys(model, spec, self.header)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        fill_native(model, self.quantization_config.spec(), self.header, self.where)
        folder = self.files[0].parent
        if (folder / LORQ_FILE).is_file():
            set_model_meta(model, read_meta(folder))
        model.save_pretrained = types.MethodType(save_pretrained, model)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Training through the packed layers works (their backward decodes Q again)."""
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """The model trains as loaded: its LoRA factors are the adapters (none when merged)."""
        return bool(self.quantization_config.trainable)


def weights_files(checkpoint_files: list[str] | None) -> list[Path]:
    """The weight files transformers resolved: one model.safetensors (``lorq.save``), or the
    shards of one folder that model.safetensors.index.json names (``compress_streaming``)."""
    files = [Path(f) for f in checkpoint_files or []]
    single = len(files) == 1 and files[0].name == WEIGHTS_FILE
    shards = bool(files) and all(
        SHARD_NAME.fullmatch(f.name) and f.parent == files[0].parent for f in files
    )
    if not (single or shards):
        raise ValueError(
            f"a lorq directory holds one {WEIGHTS_FILE} or the shards {INDEX_FILE} names; found "
            f"{[str(f) for f in files]}"
        )
    return files


def described(files: list[Path]) -> Path:
    """How errors name the weights: the one file, or the index of the shards."""
    return files[0] if len(files) == 1 else files[0].parent / INDEX_FILE


def check_model_class(model: nn.Module, spec: dict[str, Any]) -> None:
    """The layer names are the saved class's: another head (AutoModel on a causal LM) differs."""
    if spec["model_class"] and type(model).__name__ != spec["model_class"]:
        raise ValueError(
            f"this lorq directory holds a {spec['model_class']}, not a {type(model).__name__}; "
            f"load it with {spec['model_class']}.from_pretrained or the matching Auto class"
        )


def read_stored_header(files: list[Path], spec: dict[str, Any]) -> tuple[Header, dict]:
    """The weight files' headers (one header) and where each tensor is stored, checked
    against the layers before a tensor is read."""
    check_checksums(spec, files[0].parent, files)
    header: Header = {}
    where: dict[str, Path] = {}
    for file in files:
        stored = read_header(file)
        header.update(stored)
        where.update(dict.fromkeys(stored, file))
    check_header(spec, header, described(files))
    return header, where


def build_skeleton(model: nn.Module, spec: dict[str, Any], header: Header) -> None:
    """Swap every packed layer in on the meta device, its tensors shaped and typed as stored (the
    8-bit factors as the float32 they decode to; aliases share their source's tensor)."""
    factors = set(spec["int8_factors"])
    named = {
        name: torch.empty(
            shape,
            dtype=torch.float32 if name in factors else STORED_DTYPES[dtype],
            device="meta",
        )
        for name, (dtype, shape) in header.items()
    }
    named.update({a: named[s] for a, s in spec["aliases"].items() if s in named})
    for name, layer_spec in spec["layers"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no module {name!r} for a packed layer") from None
        set_module(model, name, build_layer(name, layer_spec, named))


def check_stored(model: nn.Module, spec: dict[str, Any], header: Header, file: Path) -> None:
    """Every tensor of the model is stored (itself or as an alias) with its shape, and every
    stored tensor belongs to the model (the checks ``lorq.load`` makes)."""
    aliases, held = spec["aliases"], named_tensors(model)
    for name, tensor in held.items():
        source = aliases.get(name, name)
        if source not in header:
            raise ValueError(f"{file} has no tensor {source!r}; the file is incomplete")
        if header[source][1] != tuple(tensor.shape):
            raise ValueError(
                f"{file}: tensor {source!r} has shape {list(header[source][1])}, the model "
                f"needs {list(tensor.shape)}; the directory was altered, re-run lorq compress"
            )
    unused = sorted(set(header) - set(held) - factor_scales(spec))
    if unused:
        raise ValueError(
            f"{file} holds tensors the model does not have ({unused[:3]}); "
            "the directory was altered, re-run lorq compress"
        )


def expect_native_keys(model: nn.Module, spec: dict[str, Any], header: Header) -> None:
    """Tell transformers which keys it will not find (aliases: placed after loading) and which
    stored ones are not state-dict keys (factor scales, non-persistent buffers), so its load
    report stays quiet; mark every module initialised (all is stored); keep only the tied-weight
    pairs that are still parameters."""
    keys, held = set(model.state_dict()), named_tensors(model)
    aliases = {rf"^{re.escape(a)}$" for a in spec["aliases"] if a in keys}
    extra = {rf"^{re.escape(n)}$" for n in header if n not in keys and n in held}
    missing, unexpected = (
        model._keys_to_ignore_on_load_missing,
        model._keys_to_ignore_on_load_unexpected,
    )
    model._keys_to_ignore_on_load_missing = {*(missing or ()), *aliases}
    model._keys_to_ignore_on_load_unexpected = {*(unexpected or ()), FACTOR_SCALES, *extra}
    for module in model.modules():  # every tensor is stored: transformers initialises none
        module._is_hf_initialized = True
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(model, "all_tied_weights_keys", {}) or {}
    model.all_tied_weights_keys = {t: s for t, s in tied.items() if t in params and s in params}


def fill_native(
    model: nn.Module, spec: dict[str, Any], header: Header, where: dict[str, Path]
) -> None:
    """After transformers loaded the stored tensors by name: decode the 8-bit factors, restore
    the non-persistent buffers lorq stores, place the aliases, set requires_grad. ``where``:
    the file of each stored tensor."""
    keys, factor_scale_names = set(model.state_dict()), factor_scales(spec)
    factors = set(spec["int8_factors"])
    files = list(dict.fromkeys(where.values()))
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(file, "pt")) for file in files}

        def stored(name: str) -> torch.Tensor:
            return handles[where[name]].get_tensor(name)

        for name in header:
            if name in factors:
                codes, scales = stored(name), stored(f"{name}.scales")
                value = Int8Rows(codes, scales).dequantize()
            elif name not in keys and name not in factor_scale_names:
                value = stored(name)  # a non-persistent buffer
            else:
                continue
            current = model.get_parameter_or_buffer(name)
            dtype = value.dtype if name in factors else current.dtype
            value = value.to(current.device, dtype)
            place(model, name, nn.Parameter(value) if isinstance(current, nn.Parameter) else value)
    for alias, source in spec["aliases"].items():
        place(model, alias, model.get_parameter_or_buffer(source))
    trainable = set(spec["trainable"])
    for name, param in model.named_parameters(remove_duplicate=False):
        param.requires_grad_(name in trainable)
    check_finite(named_tensors(model), spec["layers"], described(files))


def save_pretrained(
    self: nn.Module,
    save_directory: str | Path,
    is_main_process: bool = True,
    state_dict: dict | None = None,
    push_to_hub: bool = False,
    **kwargs: Any,
) -> None:
    """``save_pretrained`` of a lorq model loaded by ``from_pretrained``: lorq's native writer
    (one model.safetensors, config.json, lorq.json last), in place like transformers' own."""
    if state_dict is not None or push_to_hub or kwargs.get("variant"):
        raise ValueError(
            "a lorq model saves its own tensors to one local folder: call save_pretrained(dir) "
            "without state_dict, variant or push_to_hub (upload the folder afterwards)"
        )
    if is_main_process:
        save_in_place(self, Path(save_directory))


def save_in_place(model: nn.Module, folder: Path) -> None:
    """Write ``model`` into ``folder`` (kept, other files untouched): every file replaced
    atomically, lorq.json removed first and written last, so the folder is finished
    (``is_lorq_dir``) only once everything is written. The factors are stored as they are (no
    int8 codes): Trainer's resume_from_checkpoint reads the weights as a plain state dict."""
    tensors, meta = payload(model, factor_codes=False)
    folder.mkdir(parents=True, exist_ok=True)
    with output_lock(folder):
        (folder / LORQ_FILE).unlink(missing_ok=True)
        with atomic_file(folder / WEIGHTS_FILE) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
            meta["checksums"] = file_checksums({WEIGHTS_FILE: tmp})
        with atomic_file(folder / CONFIG_FILE) as tmp:
            write_config(model, tmp, meta)
        with atomic_file(folder / LORQ_FILE) as tmp:
            write_meta(tmp, meta)


def register() -> None:
    """Make transformers know quant_method "lorq" (idempotent; ``import lorq`` calls it)."""
    if FORMAT not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(FORMAT)(LorqConfig)
    if FORMAT not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(FORMAT)(LorqHfQuantizer)


register()
