"""A LLaMA-family GGUF file (llama, qwen2) as a transformers model whose packed layers stay
packed.

    W = d_g · code + m_g      per 32-value group g (fp16 d, m; float32 result)

transformers' GGUF loader dequantizes every tensor of the file to a dense float tensor at once:
for a Q4_1 file that is 6.4× the size of its Q4_1 tensors, all resident before anything else runs.
Here the model's parameters start on the meta device; every linear weight of a lorq format (Q4_1)
becomes a frozen :class:`~lorq.nn.QuantLinear` over the file's own codes, scales and mins (5
bits/param, not 32), a token embedding of one (Q8_0) a :class:`~lorq.nn.QuantEmbedding` (with a
tied output layer over the same buffers), and only the remaining tensors (norms, tensors of other
types) are dequantized, one at a time. The packed layers decode exactly the float32 values
transformers would hold, so the model computes the same logits; lorq's compression treats a plain
QuantLinear as a frozen linear layer and dequantizes one weight at a time when it compresses it.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorq.io.gguf import MAX_LISTED, LlamaTensor, llama_tensors
from lorq.nn import QuantEmbedding, QuantLinear
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


def _pack(model: nn.Module, tensor: LlamaTensor, output: nn.Module | None, dtype) -> bool:
    """Replace the nn.Linear (or nn.Embedding) holding ``tensor`` by a QuantLinear (or
    QuantEmbedding) over its codes; False if none (or if it is ``output``, the output layer,
    which stays dense unless tied to a packed embedding)."""
    if tensor.packed_config is None or not (tensor.param or "").endswith(".weight"):
        return False  # biases and tensors of no lorq format are read densely
    module_name = tensor.param.removesuffix(".weight")
    module = model.get_submodule(module_name)
    if module is output:
        return False
    if isinstance(module, nn.Embedding):
        set_module(model, module_name, QuantEmbedding(tensor.quantized(), dtype))
        return True
    if not isinstance(module, nn.Linear):
        return False
    layer = QuantLinear(tensor.quantized())
    if module.bias is not None:  # filled from the file's own bias tensor in the dense pass
        layer.bias = nn.Parameter(torch.empty_like(module.bias), requires_grad=False)
    set_module(model, module_name, layer)
    return True


def _tie(model: nn.Module) -> None:
    """Tie the output layer to the input embeddings: a packed table gets a QuantLinear head over
    the same buffers, a dense one transformers' own tying."""
    embedding = model.get_input_embeddings()
    if isinstance(embedding, QuantEmbedding):
        model.set_output_embeddings(embedding.tied_head())
    else:
        model.tie_weights()


def load_packed(
    path: str | Path, dtype: torch.dtype = torch.float32, config: PretrainedConfig | None = None
) -> nn.Module:
    """The causal LM of a LLaMA GGUF file, Q4_1 linears as QuantLinear, the rest in ``dtype``.

    ``config``: transformers' config of the file when the caller has read it already.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    tensors = [t for t in llama_tensors(path) if t.param is not None]  # a bad file fails here
    if config is None:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    output = model.get_output_embeddings()
    dense = [t for t in tensors if not _pack(model, t, output, dtype)]
    for tensor in dense:
        _assign(model, tensor.param, tensor.dense())
    if getattr(model.config, "tie_word_embeddings", False):
        _tie(model)
    tensors_of = itertools.chain(model.named_parameters(), model.named_buffers())
    missing = [name for name, t in tensors_of if t.is_meta]
    if missing:
        raise ValueError(
            f"{path} has no tensor for {missing[:MAX_LISTED]} (of {len(missing)} missing); "
            "the GGUF file is incomplete"
        )
    return model.eval()
