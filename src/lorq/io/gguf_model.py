"""A LLaMA GGUF file as a transformers model whose Q4_1 linear layers stay packed.

    W = d_g · code + m_g      per 32-value group g (fp16 d, m; float32 result)

transformers' GGUF loader dequantizes every tensor of the file to a dense float tensor at once:
for a Q4_1 file that is 6.4× the size of its Q4_1 tensors, all resident before anything else runs.
Here the model's parameters start on the meta device; every Q4_1 linear weight becomes a frozen
:class:`~lorq.nn.QuantLinear` over the file's own codes, scales and mins (5 bits/param, not
32), and only the remaining tensors (embeddings, norms, linears of other types) are dequantized,
one at a time. A QuantLinear dequantizes exactly the float32 values transformers would hold, so
the model computes the same logits; lorq's pipeline treats a plain QuantLinear as a frozen
linear layer and dequantizes one weight at a time when it compresses it.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorq.io.gguf import MAX_LISTED, LlamaTensor, llama_tensors
from lorq.nn import QuantLinear
from lorq.surgery import set_module

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set parameter ``name`` (a meta placeholder) of ``model`` to ``value``."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, leaf)
    if tuple(old.shape) != tuple(value.shape):
        raise ValueError(
            f"GGUF tensor for {name} has shape {tuple(value.shape)}, the model expects "
            f"{tuple(old.shape)}; the file does not match its own metadata"
        )
    setattr(module, leaf, nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad))


def _pack_linear(model: nn.Module, tensor: LlamaTensor, output: nn.Module | None) -> bool:
    """Replace the nn.Linear holding ``tensor`` by a QuantLinear over its codes; False if none
    (or if it is ``output``, the output layer, which stays dense)."""
    module_name = (tensor.param or "").removesuffix(".weight")
    module = model.get_submodule(module_name) if tensor.param else None
    if not isinstance(module, nn.Linear) or module is output or tensor.packed_format is None:
        return False
    layer = QuantLinear(tensor.quantized())
    if module.bias is not None:  # filled from the file's own bias tensor in the dense pass
        layer.bias = nn.Parameter(torch.empty_like(module.bias), requires_grad=False)
    set_module(model, module_name, layer)
    return True


def load_packed(
    path: str | Path, dtype: torch.dtype = torch.float32, config: PretrainedConfig | None = None
) -> nn.Module:
    """The causal LM of a LLaMA GGUF file, Q4_1 linears as QuantLinear, the rest in ``dtype``.

    ``config``: transformers' config of the file when the caller has read it already.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if config is None:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = [t for t in llama_tensors(path) if t.param is not None]
    output = model.get_output_embeddings()
    dense = [t for t in tensors if not _pack_linear(model, t, output)]
    for tensor in dense:
        _assign(model, tensor.param, tensor.dense())
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    tensors_of = itertools.chain(model.named_parameters(), model.named_buffers())
    missing = [name for name, t in tensors_of if t.is_meta]
    if missing:
        raise ValueError(
            f"{path} has no tensor for {missing[:MAX_LISTED]} (of {len(missing)} missing); "
            "the GGUF file is incomplete"
        )
    return model.eval()
