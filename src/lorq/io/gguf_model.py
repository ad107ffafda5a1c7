"""A LLaMA-family GGUF file as a float transformers model, decoded one tensor at a time.

    for each tensor t of the file:   W = dequantize(t)  (Q4_1 through lorq's codes, other types
                                     through the gguf package);  attn_q / attn_k rows un-permuted;
                                     copied into the model's parameter;  W freed

transformers' own GGUF loader first decodes the whole file into a state dict and then builds the
model, holding about twice the float model at its peak; here the peak is the float model plus
one tensor. The values are the same as transformers' (tested on the built-in SmolLM2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorq.io.gguf import (
    _from_blocks,
    _gguf_names,
    _int_field,
    _open,
    _rope_heads,
    _rope_rows,
)


def _decode(tensor: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 values of one GGUF tensor in the transformers shape ``shape``."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if tensor.tensor_type == GGMLQuantizationType.Q4_1 and len(shape) == 2:
        raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8))
        return _from_blocks(raw, shape[1]).dequantize()
    values = dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)  # a writable copy


def load_gguf_model(path: str | Path, config: Any) -> nn.Module:
    """``LlamaForCausalLM(config)`` (float32) with every weight decoded from the GGUF ``path``.

    ``config``: the model's transformers config (``AutoConfig.from_pretrained(dir,
    gguf_file=name)``). A parameter the file lacks is an error, except a tied LM head.
    """
    import transformers

    path = Path(path)
    reader = _open(path)
    heads = _int_field(reader, "llama.attention.head_count", path)
    kv_heads = _int_field(reader, "llama.attention.head_count_kv", path, heads)
    model = transformers.LlamaForCausalLM(config).float()
    params = dict(model.named_parameters(remove_duplicate=False))
    names = _gguf_names(config.to_dict())
    by_gguf = {gguf: hf for hf, (gguf, _) in names.items()}
    loaded = set()
    with torch.no_grad():
        for tensor in reader.tensors:
            name = by_gguf.get(tensor.name)
            if name is None:
                continue
            weight = _decode(tensor, tuple(params[name].shape))
            rope = _rope_heads(tensor.name, heads, kv_heads)
            if rope is not None:
                weight = weight[torch.argsort(_rope_rows(weight.shape[0], rope))]
            params[name].copy_(weight)
            loaded.add(name)
    missing = sorted(
        set(names) - loaded - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    )
    if missing:
        raise ValueError(f"{path} lacks tensors for {missing[:5]}; the GGUF file is incomplete")
    return model.eval()
