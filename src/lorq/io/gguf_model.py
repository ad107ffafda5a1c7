"""A GGUF file (an architecture of ``lorq.io.gguf_arch``) as a transformers model whose packed
layers stay packed, loaded whole or one part (a transformer block, the embeddings and head) at a
time.

    W = the file's own blocks       every linear of a lorq format (Q4_1, Q4_K, …) → QuantLinear
    E = the file's own blocks       a token embedding of one (Q8_0) → QuantEmbedding (+ tied head)
    everything else                 dequantized to float, one tensor at a time

transformers' GGUF loader dequantizes every tensor of the file at once: for a Q4_1 file that is
6.4× the size of its Q4_1 tensors, all resident before anything else runs. Here the model's
parameters start on the meta device and each part gets its weights when asked (``load``) and
gives them back (``release``); the packed layers decode exactly the float32 values transformers
would hold, so the model computes the same logits. ``dense=True`` decodes the linear layers too
(what the Fisher differentiates).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorq.io.gguf import MAX_LISTED, GGUFTensor, gguf_tensors
from lorq.io.gguf_meta import read_config
from lorq.model.skeleton import release_parts, skeleton, tensors_of
from lorq.model.targets import set_module
from lorq.nn import QuantEmbedding, QuantLinear
from lorq.nn.quant_embedding import embedding_scale

if TYPE_CHECKING:
    from transformers import PretrainedConfig

Part = tuple[str, nn.Module, bool]  # (qualified name, module, its submodules too)


class GGUFModel:
    """The causal LM of a GGUF file on the meta device, filled part by part."""

    def __init__(self, path: str | Path, config: PretrainedConfig | None = None):

        self.path = Path(path)
        tensors = [t for t in gguf_tensors(self.path) if t.param is not None]  # bad file: here
        self.tensors: dict[str, GGUFTensor] = {t.param: t for t in tensors}
        if config is None:
            config = read_config(self.path)
        self.model = skeleton(config, causal=True)
        self.replaced: dict[str, nn.Module] = {}  # module name → the meta module it replaced
        self.tied = bool(getattr(self.model.config, "tie_word_embeddings", False))

    def load(self, parts: list[Part], dtype: torch.dtype, device, dense: bool = False) -> None:
        """Give every tensor of ``parts`` its value: packed layers as their codes (unless
        ``dense``), the rest decoded in ``dtype`` (vectors: fp32)."""
        output = self.model.get_output_embeddings()
        for prefix, module, recurse in parts:
            for name, owner, leaf, tensor, is_param in list(tensors_of(module, prefix, recurse)):
                packed = self.replaced.get(name.rpartition(".")[0]) is owner  # its bias with it
                if is_param and tensor.is_meta and name in self.tensors and not packed:
                    self._load_one(name, owner, leaf, dtype, device, dense or owner is output)
        if self.tied and any(m is output or m is self.model for _, m, _ in parts):
            self._tie()

    def _load_one(self, name: str, owner: nn.Module, leaf: str, dtype, device, dense: bool):
        tensor = self.tensors[name]
        module_name = name.rpartition(".")[0]
        packable = tensor.packed_config is not None and leaf == "weight"
        if packable and not dense and isinstance(owner, (nn.Linear, nn.Embedding)):
            self.replaced.setdefault(module_name, owner)
            layer = self._packed(module_name, tensor, owner, dtype)
            set_module(self.model, module_name, layer.to(device))
            return
        value = tensor.dense()
        if tuple(value.shape) != tuple(owner._parameters[leaf].shape):
            raise ValueError(
                f"GGUF tensor for {name} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(owner._parameters[leaf].shape)}; the file does not match its metadata"
            )
        value = value.to(dtype if value.dim() >= 2 else torch.float32)
        owner._parameters[leaf] = nn.Parameter(value.to(device), requires_grad=False)

    def _packed(self, name: str, tensor: GGUFTensor, owner: nn.Module, dtype) -> nn.Module:
        """The QuantEmbedding / QuantLinear over the file's codes (with the layer's bias)."""
        if isinstance(owner, nn.Embedding):
            return QuantEmbedding(tensor.quantized(), dtype, embedding_scale(owner))
        bias = None
        if owner.bias is not None:
            stored = self.tensors.get(f"{name}.bias")
            if stored is None:
                raise ValueError(
                    f"{self.path} has no tensor for {name}.bias; the file is incomplete"
                )
            bias = nn.Parameter(stored.dense().float(), requires_grad=False)
        return QuantLinear(tensor.quantized(), bias)

    def _tie(self) -> None:
        """The output layer tied to the input embeddings: a packed table gets a QuantLinear head
        over the same buffers, a dense one transformers' own tying."""
        embedding = self.model.get_input_embeddings()
        if isinstance(embedding, QuantEmbedding):
            head_name = _name_of(self.model, self.model.get_output_embeddings())
            self.replaced.setdefault(head_name, self.model.get_output_embeddings())
            self.model.set_output_embeddings(embedding.tied_head())
        else:
            self.model.tie_weights()

    def release(self, parts: list[Part]) -> None:
        """Every tensor of ``parts`` back on the meta device, packed layers replaced back."""
        prefixes = [p for p, _, _ in parts]
        for name in [n for n in self.replaced if _within(n, prefixes)]:
            set_module(self.model, name, self.replaced.pop(name))
        release_parts(parts)

    def whole(self, dtype: torch.dtype = torch.float32, dense: bool = False) -> nn.Module:
        """The whole model (every part loaded), checked complete."""
        self.load([("", self.model, True)], dtype, torch.device("cpu"), dense)
        named = itertools.chain(self.model.named_parameters(), self.model.named_buffers())
        missing = [name for name, t in named if t.is_meta]
        if missing:
            raise ValueError(
                f"{self.path} has no tensor for {missing[:MAX_LISTED]} (of {len(missing)} "
                "missing); the GGUF file is incomplete"
            )
        self.replaced.clear()
        return self.model.eval()


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _within(name: str, prefixes: list[str]) -> bool:
    return any(p == "" or name == p or name.startswith(f"{p}.") for p in prefixes)


def load_packed(
    path: str | Path, dtype: torch.dtype = torch.float32, config: PretrainedConfig | None = None
) -> nn.Module:
    """The causal LM of a GGUF file, its packed linears as QuantLinear, the rest in
    ``dtype``. ``config``: transformers' config of the file when the caller has read it."""
    return GGUFModel(path, config).whole(dtype)
