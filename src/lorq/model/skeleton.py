"""A model built on the ``meta`` device whose parts get real weights one at a time.

    model = skeleton(config)                 parameters on meta, buffers real (rotary tables, ids)
    blocks = decoder_blocks(model)           the transformer blocks: model.layers, transformer.h, …
    tensors_of(module, prefix)               every tensor of a part, by qualified name
    release(module)                          its tensors back on meta (the memory is returned)

The sources of ``lorq.pipeline.sources`` give a part its weights (from a safetensors checkpoint
or a GGUF file); only the current block's weights (and, while calibration inputs are captured,
the embeddings) are ever resident: a 70B model needs the RAM of one block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def skeleton(
    config, causal: bool = True, model_class: Any = None, real_buffers: bool = True
) -> nn.Module:
    """``config``'s architecture with its parameters on the meta device: ``model_class`` (a
    transformers class) when given, else AutoModelForCausalLM when ``causal``, else AutoModel.
    Buffers (rotary frequencies, position ids) are computed for real unless ``real_buffers`` is
    False (then a stored copy replaces them). The one place lorq builds an empty model."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    with init_empty_weights(include_buffers=not real_buffers):
        if model_class is not None:
            model = model_class._from_config(config)
        else:
            auto = AutoModelForCausalLM if causal else AutoModel
            model = auto.from_config(config, trust_remote_code=False)
    model.tie_weights()  # a tied head is the embedding's own tensor, as from_pretrained makes it
    return model.eval()


@dataclass(frozen=True)
class Blocks:
    """The model's transformer blocks: ``prefix`` (e.g. ``model.layers``) and the modules."""

    prefix: str
    modules: nn.ModuleList

    def name(self, index: int) -> str:
        return f"{self.prefix}.{index}"

    def index_of(self, name: str) -> int | None:
        """The block a qualified module/tensor name lies in, None outside every block."""
        head = f"{self.prefix}."
        if not name.startswith(head):
            return None
        number = name[len(head) :].split(".", 1)[0]
        return int(number) if number.isdigit() else None

    def __len__(self) -> int:
        return len(self.modules)


def decoder_blocks(model: nn.Module) -> Blocks:
    """The ModuleList that holds most of the model's parameters (its transformer blocks)."""
    best, size = None, -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(p.numel() for p in module.parameters())
            if count > size:
                best, size = (name, module), count
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of transformer blocks to stream")
    return Blocks(*best)


def tensors_of(module: nn.Module, prefix: str, recurse: bool = True):
    """(qualified name, owning module, leaf, tensor, is parameter) of every tensor under
    ``module`` (only its own when not ``recurse``)."""
    subs = module.named_modules(remove_duplicate=False) if recurse else [("", module)]
    for sub_name, sub in subs:
        path = ".".join(p for p in (prefix, sub_name) if p)
        for is_param, store in ((True, sub._parameters), (False, sub._buffers)):
            for leaf, tensor in store.items():
                if tensor is not None:
                    yield (f"{path}.{leaf}" if path else leaf), sub, leaf, tensor, is_param


def release(module: nn.Module) -> None:
    """Every parameter of ``module`` back on the meta device (see :func:`release_parts`)."""
    release_parts([("", module, True)])


def release_parts(parts: list[tuple[str, nn.Module, bool]]) -> None:
    """Every parameter of ``parts`` ((name, module, recurse)) back on the meta device, a tied one
    still one object at all its names; buffers stay (small; some are not in the checkpoint)."""
    meta: dict[int, nn.Parameter] = {}
    for prefix, module, recurse in parts:
        for _, owner, leaf, tensor, is_param in list(tensors_of(module, prefix, recurse)):
            if is_param:
                empty = torch.empty_like(tensor, device="meta")
                new = meta.setdefault(id(tensor), nn.Parameter(empty, requires_grad=False))
                owner._parameters[leaf] = new


def outside_blocks(model: nn.Module, blocks: Blocks) -> list[tuple[str, nn.Module, bool]]:
    """The modules that own tensors outside the blocks (embeddings, final norm, head), as
    :func:`materialize` parts (their own tensors only)."""
    parts = []
    for name, module in model.named_modules():
        if name == blocks.prefix or name.startswith(f"{blocks.prefix}."):
            continue
        if module._parameters or module._buffers:
            parts.append((name, module, False))
    return parts
