"""What one shard holds, as the native format stores it, and a finished block read back.

A shard's tensors go through exactly what :func:`lorq.io.native.payload` does to a whole model
(tied tensors once, dense ones narrowed where exact, factors as int8 codes), so every tensor of a
streamed directory has the bytes of an in-memory ``lorq.save``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lorq.io.native import (
    NARROW,
    PACKED,
    _decode_factors,
    _dedupe,
    _layer_spec,
    build_layer,
    int8_factors,
    narrowed,
    place,
)
from lorq.io.verify import manifest
from lorq.model.skeleton import tensors_of
from lorq.model.targets import set_module


def gather(model: nn.Module, parts: list[tuple[str, nn.Module, bool]]) -> dict[str, torch.Tensor]:
    """{qualified name: tensor} of ``parts`` ((name, module, recurse)), in model order, shared
    tensors repeated (as ``lorq.io.native.named_tensors`` lists them)."""
    return {
        name: tensor
        for prefix, module, recurse in parts
        for name, _, _, tensor, _ in tensors_of(module, prefix, recurse)
    }


def stored(name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """(what ``lorq.save`` stores for the fp32 value of dense ``tensor``, the dtype to restore)
    — ``narrowed``'s result, without an fp32 copy of a 16-bit table: bf16 holds itself, and an
    fp16 value is bf16-exact when it survives the round trip."""
    leaf = name.rpartition(".")[2]
    if tensor.dtype not in NARROW or tensor.dim() < 2 or leaf.startswith(("q_", "lora_")):
        one = {name: tensor.float()}
        restore = narrowed(one)  # in place: read the narrowed value after it
        return one[name], restore.get(name)
    if tensor.dtype == torch.float16:
        small = tensor.to(torch.bfloat16)
        tensor = small if torch.equal(small.to(torch.float16), tensor) else tensor
    return tensor, "float32"


def shard_payload(
    model: nn.Module, parts: list[tuple[str, nn.Module, bool]], factor_codes: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, record) of ``parts`` for one shard: the record holds what lorq.json gathers
    (tensors, layers, aliases, restore_dtypes, int8_factors, trainable). Dense float tensors are
    stored from fp32, as the in-memory job holds them (then narrowed where exact), one at a time:
    a 16-bit embedding table is never held twice in fp32."""
    packed = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, PACKED))
    tensors, aliases = _dedupe(gather(model, parts))
    restore = {}
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not name.startswith(packed):
            tensors[name], restored = stored(name, tensor)
            restore.update({name: restored} if restored else {})
    factors = int8_factors(tensors) if factor_codes else []
    layers = {}
    trainable = []
    for prefix, module, recurse in parts:
        subs = module.named_modules() if recurse else [("", module)]
        for sub_name, sub in subs:
            name = ".".join(p for p in (prefix, sub_name) if p)
            if isinstance(sub, PACKED):
                layers[name] = _layer_spec(sub)
            trainable += [
                f"{name}.{leaf}"
                for leaf, p in sub._parameters.items()
                if p is not None and p.requires_grad
            ]
    record = {
        "tensors": manifest(tensors),
        "layers": layers,
        "aliases": aliases,
        "restore_dtypes": restore,
        "int8_factors": factors,
        "trainable": sorted(trainable),
    }
    return tensors, record


def load_shard_into(model: nn.Module, file: Path, record: dict[str, Any], device) -> None:
    """Put a finished shard's layers and dense tensors back into ``model`` (on ``device``): the
    exact tensors the run that wrote it computed with."""
    tensors = load_file(file, device="cpu")
    for name, dtype in record.get("restore_dtypes", {}).items():
        tensors[name] = tensors[name].to(getattr(torch, dtype))
    _decode_factors(tensors, record.get("int8_factors", []))
    named = {**{a: tensors[s] for a, s in record.get("aliases", {}).items()}, **tensors}
    for name, spec in record["layers"].items():
        set_module(model, name, build_layer(name, spec, named).to(device))
    prefixes = tuple(f"{name}." for name in record["layers"])
    for name, tensor in named.items():
        if not name.startswith(prefixes):
            module_name, _, leaf = name.rpartition(".")
            is_param = leaf in model.get_submodule(module_name)._parameters
            value = tensor.to(device)
            place(model, name, nn.Parameter(value, requires_grad=False) if is_param else value)
