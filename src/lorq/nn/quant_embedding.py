"""QuantEmbedding: a frozen token embedding whose table E (vocab × dim) is stored packed.

    y = c · E[ids]      ids (…) → y (…, dim), decoded in ``dtype`` for the rows asked for;
                        c the model's embedding scale (Gemma: √dim; 1 for most models)

The buffers are a QuantizedTensor's (named as :class:`~lorq.nn.QuantLinear`'s), so a tied output
layer is a QuantLinear over the *same* tensors: ``tied_head()`` builds it, and saving writes the
table once. Nothing is trainable.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from lorq.nn.quant_linear import PackedBuffers, buffer_name, quantized_from_buffers
from lorq.quant import QuantConfig, QuantizedTensor


class QuantEmbedding(PackedBuffers):
    """Drop-in replacement of ``nn.Embedding`` by its packed table (no padding_idx semantics
    beyond the stored row: the row is what the source held)."""

    kind: ClassVar[str] = "embedding"

    def __init__(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32, scale: float = 1.0):
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.dtype = dtype
        self.scale = float(scale)
        self.register_quantized(q)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    @classmethod
    def from_buffers(
        cls,
        config: QuantConfig,
        shape: tuple[int, int],
        buffers: dict[str, torch.Tensor],
        scale: float = 1.0,
    ) -> QuantEmbedding:
        return cls(quantized_from_buffers(config, shape, buffers), scale=scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.q.dequantize_rows(ids, self.dtype)
        if self.scale == 1.0:
            return rows
        return rows * torch.tensor(self.scale, dtype=rows.dtype)  # as transformers scales

    def tied_head(self):
        """The output layer tied to this table: a QuantLinear over the same buffers."""
        from lorq.nn.quant_linear import QuantLinear

        return QuantLinear(self.q)

    def extra_repr(self) -> str:
        scale = f", scale={self.scale:g}" if self.scale != 1.0 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, quant={self.quant_config.name}{scale}"


def embedding_scale(module: nn.Module) -> float:
    """The factor a token embedding module multiplies its rows by (Gemma's scaled embeddings:
    ``embed_scale``; a QuantEmbedding its ``scale``; 1 for a plain nn.Embedding)."""
    if isinstance(module, QuantEmbedding):
        return module.scale
    scale = getattr(module, "embed_scale", None)
    return 1.0 if scale is None else float(scale)


def tied_packed_head(model: nn.Module) -> nn.Module | None:
    """The output layer when it is a QuantLinear over the buffers of the model's QuantEmbedding
    (a tied, packed table), else None."""
    from lorq.nn.quant_linear import QuantLinear

    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return None
    embedding, head = get_in(), get_out()
    if not isinstance(embedding, QuantEmbedding) or not isinstance(head, QuantLinear):
        return None
    same = all(
        getattr(head, buffer_name(k)).data_ptr() == getattr(embedding, buffer_name(k)).data_ptr()
        for k in embedding._keys
    )
    return head if same and not head.has_lora else None


def packed_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every QuantLinear of ``model`` by name, except a tied, packed output layer (that is its
    embedding's table, not a compressed linear)."""
    from lorq.nn.quant_linear import QuantLinear

    head = tied_packed_head(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m is not head}
