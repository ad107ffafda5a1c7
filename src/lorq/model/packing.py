"""What a compressed model stores beyond its linear layers, in the precision asked for:

    token embeddings E (vocab × dim)  ─▶ QuantEmbedding of any format (a tied head shares it)
    low-rank factors B, A             ─▶ rounded to their 8-bit grid (lorq.quant.factors)

Both happen in place, once, when a model is compressed, so what is evaluated is what is saved.
"""

from __future__ import annotations

import torch
from torch import nn

from lorq.config import CompressConfig
from lorq.nn import QuantEmbedding, QuantLinear, tied_packed_head
from lorq.nn.quant_embedding import embedding_scale
from lorq.quant import QuantConfig, as_config, format_of, quantize
from lorq.quant.factors import round_rows


def round_factors(model: nn.Module) -> None:
    """Round every layer's LoRA factors to their 8-bit grid, in place (floats still)."""
    with torch.no_grad():
        for layer in model.modules():
            if getattr(layer, "has_lora", False):
                layer.lora_A.copy_(round_rows(layer.lora_A))
                layer.lora_B.copy_(round_rows(layer.lora_B))


def check_embeddings(model: nn.Module, config: CompressConfig) -> QuantConfig | None:
    """The embeddings' config, checked against the table's shape before any work."""
    if config.embeddings is None:
        return None
    quant = as_config(config.embeddings)
    get = getattr(model, "get_input_embeddings", None)
    table = get() if get is not None else None
    if table is None:
        raise ValueError("embeddings= needs a model with input embeddings (get_input_embeddings)")
    shape = getattr(table, "shape", None) or tuple(table.weight.shape)
    format_of(quant).check_shape(quant, (shape[0], shape[1]))
    return quant


def pack_embeddings(model: nn.Module, quant: QuantConfig) -> None:
    """The token embedding table as a QuantEmbedding of ``quant`` (in place); a tied output layer
    becomes a QuantLinear over the same buffers, an untied plain one a QuantLinear of its own."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    packed_head = tied_packed_head(model)
    tied = packed_head is not None or (
        isinstance(head, nn.Linear) and head.weight is getattr(embedding, "weight", None)
    )
    if isinstance(embedding, QuantEmbedding) and embedding.quant_config == quant:
        table = embedding
    else:
        weight = embedding.q.dequantize() if isinstance(embedding, QuantEmbedding) else None
        weight = embedding.weight.detach().float() if weight is None else weight
        table = QuantEmbedding(quantize(weight, quant), scale=embedding_scale(embedding))
        model.set_input_embeddings(table)
    if tied:
        model.set_output_embeddings(table.tied_head())
    elif isinstance(head, nn.Linear):
        model.set_output_embeddings(
            QuantLinear(quantize(head.weight.detach().float(), quant), head.bias)
        )
