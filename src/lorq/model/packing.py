"""What a compressed model stores beyond its linear layers, in the precision asked for (or the
plan chose, ``plan_embeddings``):

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


def input_embedding(model: nn.Module) -> tuple[str, nn.Module]:
    """(qualified name, module) of the token embedding table; ValueError without one."""
    get = getattr(model, "get_input_embeddings", None)
    table = get() if get is not None else None
    if table is None:
        raise ValueError(
            "the model has no token embedding table (get_input_embeddings) to pack or plan"
        )
    return next(n for n, m in model.named_modules() if m is table), table


def table_shape(table: nn.Module) -> tuple[int, int]:
    """(vocab, dim) of a token embedding module, packed or plain."""
    shape = getattr(table, "shape", None) or tuple(table.weight.shape)
    return int(shape[0]), int(shape[1])


def table_weight(table: nn.Module) -> torch.Tensor:
    """The table's values E (vocab × dim, fp32), decoded when packed (its scale not applied)."""
    if isinstance(table, QuantEmbedding):
        return table.q.dequantize().float()
    return table.weight.detach().float()


def tied_head(model: nn.Module) -> nn.Module | None:
    """The output layer when it computes with the token embedding table itself (tied), else
    None."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    packed = tied_packed_head(model)
    if packed is not None:
        return packed
    plain = isinstance(head, nn.Linear) and head.weight is getattr(embedding, "weight", None)
    return head if plain else None


def check_embeddings(model: nn.Module, config: CompressConfig) -> QuantConfig | None:
    """The embeddings' config, checked against the table's shape before any work."""
    if config.plan_embeddings:
        input_embedding(model)
    if config.embeddings is None:
        return None
    quant = as_config(config.embeddings)
    _, table = input_embedding(model)
    format_of(quant).check_shape(quant, table_shape(table))
    return quant


def pack_embeddings(model: nn.Module, quant: QuantConfig, head: bool = True) -> None:
    """The token embedding table as a QuantEmbedding of ``quant`` (in place); a tied output layer
    becomes a QuantLinear over the same buffers, an untied plain one a QuantLinear of its own
    (unless not ``head``: a planned table leaves an untied head as it is)."""
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    tied = tied_head(model) is not None
    if isinstance(embedding, QuantEmbedding) and embedding.quant_config == quant:
        table = embedding
    else:
        weight = table_weight(embedding)
        table = QuantEmbedding(quantize(weight, quant), scale=embedding_scale(embedding))
        model.set_input_embeddings(table)
    if tied:
        model.set_output_embeddings(table.tied_head())
    elif head and isinstance(output, nn.Linear):
        model.set_output_embeddings(
            QuantLinear(quantize(output.weight.detach().float(), quant), output.bias)
        )
