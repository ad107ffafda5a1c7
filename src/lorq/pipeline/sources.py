"""Where a compress run's weights come from: one interface for a model already in memory, a
safetensors checkpoint and a GGUF file.

    source.model                  the architecture (resident, or on the meta device)
    source.blocks                 its transformer blocks (``model.layers``, ``transformer.h``, …)
    source.load(parts, dtype, device, dense)    give ``parts`` their weights
    source.release(parts)                       take them back (streamed sources)

A *part* is (qualified name, module, whether its submodules belong to it): block b is
``(blocks.name(b), block, True)``, the tensors outside the blocks (embeddings, final norm, head)
are one part per module that owns any. ``dense=True`` gives packed linear layers (a GGUF's Q4_1)
as dense ``nn.Linear`` (what the Fisher differentiates); a resident source swaps them back on
release. Everything the pipeline computes depends on the weights, not on the source, so every
source gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorq.io.gguf_model import GGUFModel
from lorq.io.models import ModelSource, local_files, source_record
from lorq.io.safetensors import Checkpoint
from lorq.model.skeleton import Blocks, decoder_blocks, release_parts, skeleton, tensors_of
from lorq.model.targets import set_module
from lorq.nn.dense import dense_weight, is_packed_linear

Part = tuple[str, nn.Module, bool]


class Source:
    """The interface (module docstring); subclasses fill ``model``, ``blocks``, ``origin``."""

    model: nn.Module
    blocks: Blocks
    origin: ModelSource
    resident: bool = False

    def block_part(self, index: int) -> list[Part]:
        return [(self.blocks.name(index), self.blocks.modules[index], True)]

    def outside_parts(self) -> list[Part]:
        """The modules that own tensors outside the blocks, their own tensors only."""
        prefix = self.blocks.prefix
        return [
            (name, module, False)
            for name, module in self.model.named_modules()
            if not (name == prefix or name.startswith(f"{prefix}."))
            and (module._parameters or module._buffers)
        ]

    def load(self, parts: list[Part], dtype, device, dense: bool = False) -> None:
        raise NotImplementedError

    def release(self, parts: list[Part]) -> None:
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """What an artifact records of its source (lorq.json's ``source``)."""
        return source_record(self.origin)

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must find unchanged: the source's files and their sizes."""
        files = [Path(f) for f in local_files(self.origin)]
        weights = [f for f in files if f.is_file()] or [
            p for f in files if f.is_dir() for p in sorted(f.glob("*.safetensors"))
        ]
        return {
            "model": self.origin.name,
            "files": {str(f.resolve()): f.stat().st_size for f in weights},
        }

    @property
    def inputs(self) -> tuple[str, ...]:
        """Paths a run must never write into."""
        return tuple(local_files(self.origin))


@dataclass
class ResidentSource(Source):
    """A model already in memory: its parts are where they are; compression replaces its
    modules in place. ``load`` moves a part to ``device`` (and back on ``release``) and, with
    ``dense``, swaps packed linears for dense ones until ``release``."""

    model: nn.Module
    origin: ModelSource
    blocks: Blocks = field(init=False)
    resident: bool = True
    swapped: dict[str, nn.Module] = field(default_factory=dict)
    moved: dict[int, torch.device] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.blocks = decoder_blocks(self.model)

    def load(self, parts: list[Part], dtype, device, dense: bool = False) -> None:
        for prefix, module, recurse in parts:
            if recurse and _device(module) != torch.device(device):
                self.moved[id(module)] = _device(module)
                module.to(device)
            if dense:
                self._densify(prefix, module, recurse)

    def _densify(self, prefix: str, module: nn.Module, recurse: bool) -> None:
        subs = module.named_modules() if recurse else [("", module)]
        for sub_name, sub in list(subs):
            if is_packed_linear(sub):
                name = ".".join(p for p in (prefix, sub_name) if p)
                self.swapped[name] = sub
                set_module(self.model, name, _dense_linear(sub))

    def release(self, parts: list[Part]) -> None:
        for prefix, module, _ in parts:
            for name in [n for n in self.swapped if n == prefix or n.startswith(f"{prefix}.")]:
                set_module(self.model, name, self.swapped.pop(name))
            if id(module) in self.moved:
                module.to(self.moved.pop(id(module)))


def _device(module: nn.Module) -> torch.device:
    tensor = next(iter((*module.parameters(), *module.buffers())), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _dense_linear(layer: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` holding a packed layer's decoded W (and its bias)."""
    weight = dense_weight(layer)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return linear


class CheckpointSource(Source):
    """A safetensors checkpoint (one file or shards; a local folder or a hub snapshot) read
    tensor by tensor into a meta skeleton."""

    def __init__(self, origin: ModelSource, folder: Path, config: Any, causal: bool):
        self.origin, self.folder = origin, folder
        self.checkpoint = Checkpoint(folder)
        self.model = skeleton(config, causal)
        self.blocks = decoder_blocks(self.model)

    def load(self, parts: list[Part], dtype, device, dense: bool = False) -> None:
        materialize(self.model, parts, self.checkpoint, dtype, device)

    def release(self, parts: list[Part]) -> None:
        release_parts(parts)

    def fingerprint(self) -> dict[str, Any]:
        files = sorted({e.shard for e in self.checkpoint.entries.values()})
        return {
            "folder": str(self.folder.resolve()),
            "files": {f.name: f.stat().st_size for f in files},
        }


class GGUFSource(Source):
    """A LLaMA-family GGUF file: each part read from the file when loaded, its packed layers as
    their own codes (``lorq.io.gguf_model``)."""

    def __init__(self, origin: ModelSource, config: Any = None):
        self.origin = origin
        self.file = GGUFModel(Path(origin.path) / str(origin.gguf_file), config)
        self.model = self.file.model
        self.blocks = decoder_blocks(self.model)

    def load(self, parts: list[Part], dtype, device, dense: bool = False) -> None:
        self.file.load(parts, dtype, device, dense)

    def release(self, parts: list[Part]) -> None:
        self.file.release(parts)


def checkpoint_name(model: nn.Module, name: str, checkpoint: Checkpoint) -> str | None:
    """The checkpoint's name for the model's tensor ``name``: itself, or without / with the
    base model's prefix (a GPT2Model checkpoint loaded as GPT2LMHeadModel: ``h.0…``)."""
    prefix = getattr(model, "base_model_prefix", "")
    for candidate in (name, name.removeprefix(f"{prefix}."), f"{prefix}.{name}"):
        if candidate in checkpoint:
            return candidate
    return None


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
