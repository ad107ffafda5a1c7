"""A model built on the ``meta`` device whose parts get real weights one at a time.

    model = skeleton(config)                 parameters on meta, buffers real (rotary tables, ids)
    blocks = decoder_blocks(model)           the transformer blocks: model.layers, transformer.h, …
    materialize(model, prefix, checkpoint)   a part's parameters read from the checkpoint
    release(module)                          its tensors back on meta (the memory is returned)

Only the current block's weights (and, while calibration inputs are captured, the embeddings)
are ever resident: a 70B model needs the RAM of one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorq.stream.checkpoint import Checkpoint


def skeleton(config, causal: bool) -> nn.Module:
    """``config``'s architecture (AutoModelForCausalLM when ``causal``, else AutoModel) with its
    parameters on the meta device; buffers (rotary frequencies, position ids) are real."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if causal else AutoModel
    with init_empty_weights(include_buffers=False):
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


def checkpoint_name(model: nn.Module, name: str, checkpoint: Checkpoint) -> str | None:
    """The checkpoint's name for the model's tensor ``name``: itself, or without / with the
    base model's prefix (a GPT2Model checkpoint loaded as GPT2LMHeadModel: ``h.0…``)."""
    prefix = getattr(model, "base_model_prefix", "")
    for candidate in (name, name.removeprefix(f"{prefix}."), f"{prefix}.{name}"):
        if candidate in checkpoint:
            return candidate
    return None


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


def materialize(
    model: nn.Module,
    parts: list[tuple[str, nn.Module, bool]],
    checkpoint: Checkpoint,
    dtype: torch.dtype | None,
    device: torch.device,
) -> None:
    """Give every meta tensor of ``parts`` ((qualified name, module, recurse)) its checkpoint
    value on ``device`` in ``dtype`` (None: matrices as stored, vectors — norms, biases — in
    fp32); a tied tensor (one object at two names, e.g. a tied LM head) is read once and placed
    at both; real buffers the checkpoint lacks keep their values."""
    placed: dict[int, torch.Tensor] = {}
    for prefix, module, recurse in parts:
        for name, owner, leaf, tensor, is_param in list(tensors_of(module, prefix, recurse)):
            value = placed.get(id(tensor))
            if value is None:
                value = _read(model, name, tensor, checkpoint, dtype, device)
                if value is None:
                    continue
                value = nn.Parameter(value, requires_grad=False) if is_param else value
                placed[id(tensor)] = value
            (owner._parameters if is_param else owner._buffers)[leaf] = value


def _read(model, name, tensor, checkpoint: Checkpoint, dtype, device) -> torch.Tensor | None:
    """The checkpoint's value of ``name`` checked against the architecture's shape; None for a
    real buffer the checkpoint does not hold."""
    stored = checkpoint_name(model, name, checkpoint)
    if stored is None:
        if tensor.is_meta:
            raise ValueError(f"checkpoint {checkpoint.folder} has no tensor {name!r}")
        return None
    value = checkpoint.tensor(stored)
    if tuple(value.shape) != tuple(tensor.shape):
        raise ValueError(
            f"checkpoint tensor {stored!r} has shape {list(value.shape)}, the config's "
            f"architecture needs {list(tensor.shape)}; config.json and the weights disagree"
        )
    if value.is_floating_point() and (dtype is not None or value.dim() < 2):
        value = value.to(dtype or torch.float32)  # as stored: matrices; vectors in fp32
    return value.to(device)


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
